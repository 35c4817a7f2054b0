"""Chart reads (monitor.store.series): rollups keep spikes, stay exact while a run grows, and
a read touches a bounded number of rows whatever the run length. SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from monitor import divergence
from monitor.errors import InvalidInput
from monitor.store import series
from monitor.store.database import Database
from monitor.store.drilldown import write_histograms
from monitor.store.runs import get_or_create_run
from monitor.store.step_writes import StepRecord, write_step_records
from monitor.store.steps import read_steps, write_metrics
from monitor.store.tables import STEP_QUANTITIES


def bulk_steps(db: Database, run_id: int, steps: np.ndarray, **cols: np.ndarray) -> None:
    """Fast test data: the driver's executemany with tuples."""
    names = ["run_id", "step", "wall_time", "status", "ranks_seen", *cols]
    ph = ", ".join([db.paramstyle] * len(names))
    rows = [
        (run_id, int(s), 1.7e9 + float(s), "ok", 1, *(_f(c[i]) for c in cols.values()))
        for i, s in enumerate(steps)
    ]
    with db.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO steps ({', '.join(names)}) VALUES ({ph})", rows)


def _f(x: float) -> float | None:
    return None if x != x else float(x)


def stored_rollups(db: Database, run_id: int) -> pd.DataFrame:
    with db.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT level, bucket, n, step_min, step_max, wall_min, wall_max, stats "
                "FROM step_rollups WHERE run_id = :r ORDER BY level, bucket"
            ),
            {"r": run_id},
        ).all()
    return pd.DataFrame(
        [(*r[:7], bytes(r[7])) for r in rows],
        columns=["level", "bucket", "n", "step_min", "step_max", "wall_min", "wall_max", "stats"],
    )


def test_choose_level() -> None:
    assert series.choose_level(600, 600) == 0
    assert series.choose_level(601, 600) == series.BASE_LEVEL
    assert series.choose_level(4800, 600) == series.BASE_LEVEL
    assert series.choose_level(4801, 600) == series.BASE_LEVEL + 1
    assert series.choose_level(1_000_000, 600) == 11  # 2048-step buckets: 489 of them
    assert series.choose_level(10_000_000, 600) == 15
    with pytest.raises(InvalidInput):
        series.choose_level(10, 0)


@pytest.mark.slow
def test_spike_of_one_step_in_a_million_survives_full_zoom_out(sqlite_db: Database) -> None:
    db = sqlite_db
    run = get_or_create_run(db, "p", "long")
    n = 1_000_000
    rng = np.random.default_rng(0)
    kl = rng.normal(1.0, 0.05, n)
    kl[654_321] = 42.0
    dip = rng.normal(0.0, 0.01, n)
    dip[123_457] = -7.0
    bulk_steps(db, run.id, np.arange(n), kl_mean=kl, k1=dip)
    s = series.read_series(db, run.id, ["kl_mean", "k1"], max_buckets=600)
    assert s.level == 11
    points = len(s.frame) + len(s.tail)
    assert points <= 600 + 2 * series.MAX_LEVEL + 2**series.BASE_LEVEL + series.COMPLETE_LAG
    c = s.combined()
    assert c["kl_mean__max"].max() == kl.max() == 42.0
    assert c["k1__min"].min() == dip.min() == -7.0
    assert int(c["n"].sum()) == n
    # the weighted mean of the bucket means is the true mean
    assert np.isclose((c["kl_mean"] * c["n"]).sum() / n, kl.mean(), rtol=1e-12)
    # zooming in to 500 steps around the spike reads raw rows; to 4000, 8-step buckets
    z = series.read_series(db, run.id, ["kl_mean"], start=654_000, end=654_499)
    assert z.level == 0 and len(z.frame) == 500 and z.frame["kl_mean"].max() == 42.0
    z = series.read_series(db, run.id, ["kl_mean"], start=652_000, end=655_999)
    assert z.level == series.BASE_LEVEL and z.combined()["kl_mean__max"].max() == 42.0


def test_rollups_built_while_a_run_grows_equal_a_fresh_build(db: Database, monkeypatch) -> None:
    """Reads in between writes store buckets piecewise; the result is the same as building
    them once at the end (gaps, missing values and a late start included), and the same
    through PostgreSQL's COPY path as through executemany."""
    rng = np.random.default_rng(3)
    steps = np.sort(rng.choice(np.arange(500, 40_000), size=9_000, replace=False))
    kl = rng.gamma(2.0, 0.5, len(steps))
    reward = rng.normal(size=len(steps))
    reward[rng.random(len(steps)) < 0.3] = np.nan
    grown = get_or_create_run(db, "p", "grown")
    fresh = get_or_create_run(db, "p", "fresh")
    for part in np.array_split(np.arange(len(steps)), 7):
        bulk_steps(db, grown.id, steps[part], kl_mean=kl[part], reward_mean=reward[part])
        series.read_series(db, grown.id, ["kl_mean"], max_buckets=50)
    bulk_steps(db, fresh.id, steps, kl_mean=kl, reward_mean=reward)
    monkeypatch.setattr(series, "COPY_MIN_ROWS", 10)
    assert series.refresh_rollups(db, fresh.id) > 0
    assert series.refresh_rollups(db, fresh.id) == 0  # nothing new: nothing written
    a, b = stored_rollups(db, grown.id), stored_rollups(db, fresh.id)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    # every complete bucket of every level is there
    last = int(steps.max())
    for level in range(series.BASE_LEVEL, 16):
        complete = ((last - series.COMPLETE_LAG + 1) >> level) - 1
        stored = set(a.loc[a.level == level, "bucket"])
        expected = {int(x) for x in np.unique(steps >> level) if x <= complete}
        assert stored == expected, level


@pytest.mark.parametrize("start,end", [(None, None), (1234, 38_000), (20_000, 20_900)])
def test_a_read_covers_every_row_of_its_range_once(db: Database, start, end) -> None:
    rng = np.random.default_rng(5)
    steps = np.sort(rng.choice(np.arange(0, 40_000), size=12_000, replace=False))
    kl = rng.gamma(2.0, 0.5, len(steps))
    run = get_or_create_run(db, "p", "r")
    bulk_steps(db, run.id, steps, kl_mean=kl)
    s = series.read_series(db, run.id, ["kl_mean"], start=start, end=end, max_buckets=100)
    c = s.combined()
    lo = steps.min() if start is None else start
    hi = steps.max() if end is None else end
    inside = (steps >= lo) & (steps <= hi)
    if s.level:
        # whole buckets at the edges may reach outside the range
        assert c["step"].min() <= lo and c["step_end"].max() >= hi
        assert int(c["n"].sum()) >= int(inside.sum())
        frame = s.frame
        assert (np.diff(frame["step"]) == s.bucket_size).all()  # dense: x0 + i * dx
        assert len(frame) <= 100
    else:
        assert int(c["n"].sum()) == int(inside.sum())
    assert c["kl_mean__max"].max() == kl[inside].max()
    assert s.last_step == int(steps[inside].max()) or s.last_step == hi


def test_metric_series_and_rows_after(db: Database) -> None:
    run = get_or_create_run(db, "p", "m")
    n = 5000
    vals = np.sin(np.arange(n) / 100.0)
    vals[4321] = 9.0
    write_metrics(db, run.id, [(i, "loss", float(vals[i])) for i in range(n)])
    write_metrics(db, run.id, [(i, "lr", 1e-5) for i in range(0, n, 10)])
    s = series.read_metric_series(db, run.id, "loss", max_buckets=100)
    assert s.level > 0
    assert s.combined()["value__max"].max() == 9.0
    assert int(s.combined()["n"].sum()) == n
    lr = series.read_metric_series(db, run.id, "lr", max_buckets=5000)
    assert lr.level == 0 and len(lr.frame) == 500
    after = series.read_metric_rows_after(db, run.id, "loss", 4990)
    assert after["step"].tolist() == list(range(4991, 5000))
    bulk_steps(db, run.id, np.arange(10), kl_mean=np.arange(10.0))
    rows = series.read_step_rows_after(db, run.id, 6, ["kl_mean"])
    assert rows["step"].tolist() == [7, 8, 9] and rows["kl_mean"].tolist() == [7.0, 8.0, 9.0]


def test_empty_run_and_bad_input(db: Database) -> None:
    run = get_or_create_run(db, "p", "empty")
    s = series.read_series(db, run.id, ["kl_mean"])
    assert s.empty and s.last_step is None
    assert series.step_bounds(db, run.id) == (None, None)
    with pytest.raises(InvalidInput, match="not step quantities"):
        series.read_series(db, run.id, ["kl_mean; DROP TABLE runs"])
    with pytest.raises(InvalidInput, match="after end"):
        series.read_series(db, run.id, ["kl_mean"], start=10, end=5)
    with pytest.raises(InvalidInput, match="outside"):
        series.read_series(db, run.id, ["kl_mean"], start=-1)


def test_histogram_columns_are_spread_over_the_run(db: Database) -> None:
    run = get_or_create_run(db, "p", "h")
    write_histograms(db, run.id, [(s, [s % 3, 1, 2]) for s in range(0, 10_000, 10)])
    steps, counts = series.read_histogram_columns(db, run.id, max_columns=100)
    assert len(steps) == 100 and counts.shape == (100, 3)
    assert steps[0] == 0 and (np.diff(steps) == 100).all()
    steps, counts = series.read_histogram_columns(db, run.id, start=500, end=990)
    assert steps.tolist() == list(range(500, 1000, 10))
    assert counts[:, 0].tolist() == [s % 3 for s in range(500, 1000, 10)]


def _record(step: int, kl: float, **kw) -> StepRecord:
    values = tuple(kl if c == "kl_mean" else None for c in STEP_QUANTITIES)
    return StepRecord(step, 1.7e9 + step, payload_hash=f"h{step}-{kl}", values=values, **kw)


def test_a_late_step_rebuilds_the_buckets_that_cover_it(db: Database) -> None:
    """A step stored below what is rolled up already (a spool replayed after the run went on)
    must show in the chart: its buckets are rebuilt, equal to a build from scratch."""
    steps = [s for s in range(3000) if s != 500]
    late = get_or_create_run(db, "p", "late")
    fresh = get_or_create_run(db, "p", "fresh")
    write_step_records(db, late.id, [_record(s, 1.0) for s in steps])
    before = series.read_series(db, late.id, ["kl_mean"], max_buckets=100)
    assert before.level > 0 and before.combined()["kl_mean__max"].max() == 1.0
    write_step_records(db, late.id, [_record(500, 1000.0)])
    after = series.read_series(db, late.id, ["kl_mean"], max_buckets=100)
    assert after.combined()["kl_mean__max"].max() == 1000.0
    assert int(after.combined()["n"].sum()) == 3000
    write_step_records(db, fresh.id, [_record(s, 1000.0 if s == 500 else 1.0) for s in range(3000)])
    series.refresh_rollups(db, fresh.id)
    pd.testing.assert_frame_equal(stored_rollups(db, late.id), stored_rollups(db, fresh.id))
    # an append past the frontier drops nothing
    n_stored = len(stored_rollups(db, late.id))
    write_step_records(db, late.id, [_record(3000, 1.0)])
    assert len(stored_rollups(db, late.id)) == n_stored


def test_a_partial_step_completed_late_updates_its_buckets(db: Database) -> None:
    """Multi-rank: a step stays 'partial' until its last rank arrives; if that is after its
    bucket was built, the bucket must take the merged numbers."""
    rng = np.random.default_rng(9)

    def shard(step: int, rank: int, shift: float) -> StepRecord:
        p = -rng.gamma(1.0, 1.0, (4, 8))
        part = divergence.partials(p, p - shift)
        return StepRecord(step, 1.7e9 + step, f"{step}/{rank}/{shift}", rank=rank, partials=part)

    run = get_or_create_run(db, "p", "ranks")
    write_step_records(db, run.id, [shard(s, 0, 0.1) for s in range(1000)], world_size=2)
    write_step_records(
        db, run.id, [shard(s, 1, 0.1) for s in range(1000) if s != 123], world_size=2
    )
    before = series.read_series(db, run.id, ["kl_mean"], max_buckets=50)
    assert before.level > 0
    write_step_records(db, run.id, [shard(123, 1, 50.0)], world_size=2)  # a drifting rank
    after = series.read_series(db, run.id, ["kl_mean"], start=120, end=127, max_buckets=1)
    merged = read_steps(db, run.id, start=123, end=123)["kl_mean"].iloc[0]
    assert merged > 100  # (8 tokens x 0.1 + 8 x 50) / 2 sequences per rank, averaged
    assert after.combined()["kl_mean__max"].max() == pytest.approx(merged)


def test_a_late_metric_rebuilds_its_buckets(db: Database) -> None:
    run = get_or_create_run(db, "p", "metric-late")
    write_metrics(db, run.id, [(i, "loss", 0.5) for i in range(4000) if i != 700])
    assert series.read_metric_series(db, run.id, "loss", max_buckets=100).level > 0
    write_metrics(db, run.id, [(700, "loss", 99.0)])
    s = series.read_metric_series(db, run.id, "loss", max_buckets=100)
    assert s.combined()["value__max"].max() == 99.0
    assert int(s.combined()["n"].sum()) == 4000
