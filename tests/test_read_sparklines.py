"""read_sparklines (the Runs page sparklines of every run in a few statements): a short run's
raw values averaged in groups, a long run's complete coarse buckets then its latest value,
computed here from the raw steps; with rollups behind (brought up to date) and up to date.
SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.errors import InvalidInput
from monitor.store import series as store_series
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import read_steps, write_steps


def _expected(db: Database, run_id: int, col: str, max_buckets: int) -> np.ndarray:
    """The sparkline from the raw steps: means of groups or of complete buckets."""
    df = read_steps(db, run_id, columns=["step", col])
    if df.empty:
        return np.empty(0)
    steps = df["step"].to_numpy(dtype=int)
    values = df[col].to_numpy(dtype=float)
    lo, hi = int(steps.min()), int(steps.max())
    if hi - lo + 1 <= store_series.SPARK_RAW_SPAN:
        if len(values) <= 2 * max_buckets:
            return values
        return np.array([np.nanmean(g) for g in np.array_split(values, 2 * max_buckets)])
    level = store_series.choose_level(hi - lo + 1, max_buckets)
    last_complete = ((hi - store_series.COMPLETE_LAG + 1) >> level) - 1
    buckets = steps >> level
    means = [
        float(np.nanmean(values[buckets == b]))
        for b in range(lo >> level, last_complete + 1)
        if (buckets == b).any()
    ]
    latest = values[np.isfinite(values)][-1]
    return np.array([*means, latest])


def test_read_sparklines_from_raw_values_and_coarse_buckets(db: Database) -> None:
    columns: dict[int, str] = {}
    # raw (few steps, and a few more than the points), bucketed (gaps, an odd length, only
    # k3, a last step without the column)
    for name, steps, col in (
        ("short", range(5), "kl_mean"),
        ("grouped", range(100), "kl_mean"),
        ("gappy", range(0, 3001, 3), "kl_mean"),
        ("odd", range(777), "kl_mean"),
        ("k3only", range(10, 400), "k3"),
    ):
        run = get_or_create_run(db, "spark", name)
        write_steps(
            db, run.id, [{"step": s, "wall_time": 1e9 + s, col: np.sin(s / 40)} for s in steps]
        )
        columns[run.id] = col
    tail = next(r for r, c in columns.items() if c == "k3")
    write_steps(db, tail, [{"step": 400, "wall_time": 2e9, "kl_mean": 5.0}])  # no k3
    empty = get_or_create_run(db, "spark", "empty")
    columns[empty.id] = "kl_mean"
    for _ in range(2):  # rollups behind (brought up to date on the way), then up to date
        got = store_series.read_sparklines(db, columns, max_buckets=12)
        assert set(got) == set(columns)
        for rid, col in columns.items():
            want = _expected(db, rid, col, 12)
            np.testing.assert_allclose(got[rid], want, rtol=1e-12, err_msg=str(rid))
            assert len(got[rid]) <= 24
    lengths = [len(got[r]) for r in columns]
    assert lengths[:2] == [5, 24] and all(n >= 6 for n in lengths[2:5])
    assert got[tail][-1] == pytest.approx(np.sin(399 / 40))
    assert len(got[empty.id]) == 0
    assert store_series.read_sparklines(db, {}) == {}
    with pytest.raises(InvalidInput, match="not step quantities"):
        store_series.read_sparklines(db, {empty.id: "name"})


def test_a_live_run_gets_its_new_buckets(db: Database) -> None:
    """Steps written after a read complete new buckets: the next read has them."""
    run = get_or_create_run(db, "spark", "live")
    write_steps(db, run.id, [{"step": s, "wall_time": 1.0, "kl_mean": 1.0} for s in range(400)])
    first = store_series.read_sparklines(db, {run.id: "kl_mean"})[run.id]
    write_steps(
        db, run.id, [{"step": s, "wall_time": 1.0, "kl_mean": 2.0} for s in range(400, 800)]
    )
    second = store_series.read_sparklines(db, {run.id: "kl_mean"})[run.id]
    np.testing.assert_allclose(second, _expected(db, run.id, "kl_mean", 12))
    assert first[-1] == 1.0 and second[-1] == 2.0 and second.max() == 2.0
