"""read_sparklines (the Runs page sparklines of every run in a few statements) gives the
values read_series(...).combined() gives run by run, with rollups behind and up to date.
SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.errors import InvalidInput
from monitor.store import series as store_series
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps


def test_read_sparklines_equals_read_series_run_by_run(db: Database) -> None:
    columns: dict[int, str] = {}
    # raw (few steps), bucketed with a tail of lower levels and raw rows, gaps, only k3
    for name, steps, col in (
        ("short", range(5), "kl_mean"),
        ("gappy", range(0, 3001, 3), "kl_mean"),
        ("odd", range(777), "kl_mean"),
        ("k3only", range(10, 400), "k3"),
    ):
        run = get_or_create_run(db, "spark", name)
        write_steps(
            db, run.id, [{"step": s, "wall_time": 1e9 + s, col: np.sin(s / 40)} for s in steps]
        )
        columns[run.id] = col
    empty = get_or_create_run(db, "spark", "empty")
    columns[empty.id] = "kl_mean"
    for _ in range(2):  # rollups behind (read run by run, and caught up), then up to date
        got = store_series.read_sparklines(db, columns, max_buckets=12)
        assert set(got) == set(columns)
        for rid, col in columns.items():
            want = store_series.read_series(db, rid, [col], max_buckets=12).combined()
            np.testing.assert_array_equal(got[rid], want[col].to_numpy(dtype=float))
    assert len(got[empty.id]) == 0 and len(got[next(iter(columns))]) == 5
    assert store_series.read_sparklines(db, {}) == {}
    with pytest.raises(InvalidInput, match="not step quantities"):
        store_series.read_sparklines(db, {empty.id: "name"})
