"""Extra metrics as column blocks (monitor/store/metric_blocks.py): what goes in comes out,
live appends merge into the open block, replays are no-ops and conflicts are kept as stored,
chart reads agree with the raw values at every level, and migration 0009 moves the rows of
the old ``metrics`` table. SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from monitor.store import series
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.metric_blocks import BLOCK_STEPS
from monitor.store.runs import get_or_create_run
from monitor.store.schema import upgrade
from monitor.store.step_writes import (
    StepRecord,
    write_metric_columns,
    write_metric_records,
    write_step_records,
)
from monitor.store.steps import (
    metric_names,
    read_metrics,
    read_metrics_long,
    steps_with_data,
    stored_between,
    write_metrics,
)


def _blocks(db: Database, run_id: int, name: str) -> list[tuple[int, int]]:
    with db.begin() as conn:
        rows = conn.execute(
            text("SELECT block, n FROM metric_blocks WHERE run_id = :r AND name = :n"),
            {"r": run_id, "n": name},
        ).all()
    return sorted((int(b), int(n)) for b, n in rows)


def test_values_come_back_across_blocks_with_nulls(db: Database) -> None:
    run = get_or_create_run(db, "p", "round-trip")
    steps = [0, 1, 127, 128, 300, 5000, 10**12]
    written = [(s, "loss", s / 7) for s in steps] + [(3, "lr", None), (129, "lr", 1e-5)]
    assert write_metrics(db, run.id, written) == len(written)
    long = read_metrics_long(db, run.id)
    got = {(s, n): v for s, n, v in zip(long["step"], long["name"], long["value"], strict=True)}
    assert set(got) == {(s, n) for s, n, _ in written}
    assert all(got[(s, n)] == v for s, n, v in written if v is not None)
    assert np.isnan(got[(3, "lr")])
    assert metric_names(db, run.id) == ["loss", "lr"]
    assert steps_with_data(db, run.id) == sorted({*steps, 3, 129})
    _, stored = stored_between(db, run.id, 1, 200)
    assert stored == {(1, "loss"): 1 / 7, (127, "loss"): 127 / 7, (128, "loss"): 128 / 7,
                      (3, "lr"): None, (129, "lr"): 1e-5}  # fmt: skip
    wide = read_metrics(db, run.id, ["loss"], start=100, end=400)
    assert wide["step"].tolist() == [127, 128, 300]
    assert _blocks(db, run.id, "loss") == [(0, 3), (1, 1), (2, 1), (39, 1), (10**12 >> 7, 1)]


def test_live_appends_merge_into_the_open_block(db: Database) -> None:
    run = get_or_create_run(db, "p", "live")
    for start in range(0, 300, 3):  # the committer: a few steps at a time
        groups = [(s, [("loss", s * 0.5), ("lr", 1e-4)]) for s in range(start, start + 3)]
        assert write_metric_records(db, run.id, groups, seen_at=1.0) == 6
    assert _blocks(db, run.id, "loss") == [(0, 128), (1, 128), (2, 44)]
    # a replayed batch is a no-op; a different value is a conflict, never an overwrite
    assert write_metric_records(db, run.id, [(10, [("loss", 5.0)])]) == 0
    again = write_metric_columns(
        db, run.id, {"loss": (np.array([10, 11, 400]), np.array([5.0, -1.0, 2.0]))}
    )
    assert (again.inserted, again.duplicates, again.conflicts) == (1, 1, [(11, "loss")])
    long = read_metrics_long(db, run.id, ["loss"])
    assert long.set_index("step")["value"].to_dict()[11] == 5.5
    assert len(long) == 301
    # step records carry metrics through the same path
    rec = StepRecord(step=301, wall_time=2.0, payload_hash="h", metrics=[("loss", 1.0)])
    assert write_step_records(db, run.id, [rec]).metrics == 1
    assert _blocks(db, run.id, "loss")[-2:] == [(2, 45), (3, 1)]


@pytest.mark.parametrize(
    ("max_buckets", "dense"),
    [(40, False), (300, False), (3000, False), (50_000, False), (300, True), (3000, True)],
)
def test_metric_series_agree_with_the_raw_values(
    db: Database, max_buckets: int, dense: bool
) -> None:
    """Sparse steps decode the bitmaps; a dense series (full blocks) is split by reshape."""
    run = get_or_create_run(db, "p", f"series-{max_buckets}-{dense}")
    rng = np.random.default_rng(1)
    steps = np.arange(40_000) if dense else np.sort(rng.choice(40_000, 20_000, replace=False))
    values = rng.normal(size=len(steps))
    if dense:  # values stored as NULL (stored rollup levels weigh their means by rows)
        values[rng.choice(len(steps), 50)] = np.nan
    values[777] = 50.0
    write_metric_columns(db, run.id, {"loss": (steps, values)})
    lo, hi = 1_000, 33_333
    s = series.read_metric_series(db, run.id, "loss", start=lo, end=hi, max_buckets=max_buckets)
    inside = (steps >= lo) & (steps <= hi)
    c = s.combined()
    assert c["value__max"].max() == np.nanmax(values[inside])
    assert c["value__min"].min() == np.nanmin(values[inside])
    if s.level == 0:
        assert c["step"].tolist() == steps[inside].tolist()
        return
    # whole buckets: the first may start before lo, the last end after hi
    first, last = int(s.frame["step"].iloc[0]), max(hi, int(s.frame["step_end"].iloc[-1]))
    covered = (steps >= first) & (steps <= last)
    assert int(c["n"].sum()) == int(covered.sum())
    full = s.frame[s.frame["n"] > 0]
    for _, b in full.sample(min(20, len(full)), random_state=0).iterrows():
        m = (steps >= b["step"]) & (steps <= b["step_end"])
        assert b["n"] == m.sum()
        assert b["value"] == pytest.approx(np.nanmean(values[m]), rel=1e-9)
        assert (b["value__min"], b["value__max"]) == (np.nanmin(values[m]), np.nanmax(values[m]))
    after = series.read_metric_rows_after(db, run.id, "loss", 39_000, limit=50)
    assert after["step"].tolist() == steps[steps > 39_000][:50].tolist()
    assert series.read_metric_rows_after(db, run.id, "loss", 40_000).empty


def test_migration_0009_moves_the_metric_rows(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0006")
    old = [(1, s, "loss", s / 3) for s in (0, 5, 127, 128, 4000)]
    old += [(1, 7, "lr", None), (2, 1, "loss", 2.5)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags) VALUES (1, 'p', 'a', 'finished', 'live', 0, 0, 1, "
                "'{}', '[]'), (2, 'p', 'b', 'finished', 'live', 0, 0, 1, '{}', '[]')"
            )
        )
        conn.execute(
            text("INSERT INTO metrics (run_id, step, name, value) VALUES (:r, :s, :n, :v)"),
            [{"r": r, "s": s, "n": n, "v": v} for r, s, n, v in old],
        )
        conn.execute(
            text(
                "INSERT INTO metric_rollups (run_id, name, level, bucket, n, step_min, step_max, "
                "stats) VALUES (1, 'loss', 3, 0, 3, 0, 5, :b)"
            ),
            {"b": b"\0" * 24},
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM metric_rollups")).scalar() == 0
    engine.dispose()
    db = Database.open(empty_db_url)
    try:
        for run_id in (1, 2):
            long = read_metrics_long(db, run_id)
            got = sorted(
                (int(s), n, None if v != v else v)
                for s, n, v in zip(long["step"], long["name"], long["value"], strict=True)
            )
            assert got == sorted((s, n, v) for r, s, n, v in old if r == run_id)
        assert _blocks(db, 1, "loss") == [(0, 3), (1, 1), (4000 // BLOCK_STEPS, 1)]
        s = series.read_metric_series(db, 1, "loss")
        assert s.combined()["value__max"].max() == 4000 / 3
    finally:
        db.dispose()
