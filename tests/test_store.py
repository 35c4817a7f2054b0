"""The store on SQLite and PostgreSQL: runs, idempotent steps, metrics, drill-down data."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from monitor.errors import DatabaseUnavailable, InvalidInput, NotFound
from monitor.store.database import Database
from monitor.store.drilldown import (
    add_annotation,
    list_annotations,
    read_histograms,
    read_samples,
    write_histograms,
    write_samples,
)
from monitor.store.runs import (
    get_or_create_run,
    get_run,
    list_runs,
    resolve_run,
    set_baseline_run,
    set_run_status,
)
from monitor.store.steps import read_metrics, read_steps, write_metrics, write_steps


def _rows(steps, kl=1.0, h="h"):
    return [
        {
            "step": s,
            "wall_time": 1000.0 + s,
            "kl_mean": kl * s,
            "k3": 0.01,
            "payload_hash": f"{h}{s}",
        }
        for s in steps
    ]


def test_run_is_created_once_and_found_by_name_or_id(db: Database) -> None:
    a = get_or_create_run(db, "proj", "ppo-a", config={"kl_coef": 0.05, "target_kl": 6})
    again = get_or_create_run(db, "proj", "ppo-a", config={"ignored": True})
    assert again.id == a.id
    assert again.config == {"kl_coef": 0.05, "target_kl": 6}
    assert resolve_run(db, "ppo-a").id == a.id
    assert resolve_run(db, str(a.id)).name == "ppo-a"
    assert resolve_run(db, "proj/ppo-a").id == a.id
    with pytest.raises(NotFound, match="no run named 'nope'"):
        resolve_run(db, "nope")
    with pytest.raises(NotFound, match="run 999 does not exist"):
        get_run(db, 999)


def test_ambiguous_run_name_asks_for_project(db: Database) -> None:
    get_or_create_run(db, "p1", "same")
    get_or_create_run(db, "p2", "same")
    with pytest.raises(NotFound, match="ambiguous"):
        resolve_run(db, "same")
    assert resolve_run(db, "p2/same").project == "p2"


def test_concurrent_creators_get_the_same_run(db: Database) -> None:
    ids: list[int] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            ids.append(get_or_create_run(db, "proj", "ranked").id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 1


def test_steps_replay_is_a_noop_and_conflicts_are_refused(db: Database) -> None:
    run = get_or_create_run(db, "proj", "r")
    first = write_steps(db, run.id, _rows(range(10)))
    assert (first.inserted, first.duplicates, first.conflicts) == (10, 0, ())
    replay = write_steps(db, run.id, _rows(range(5, 12)))
    assert (replay.inserted, replay.duplicates, replay.conflicts) == (2, 5, ())
    conflict = write_steps(db, run.id, _rows([3, 4, 20], kl=9.0, h="other"))
    assert conflict.inserted == 1
    assert conflict.conflicts == (3, 4)
    df = read_steps(db, run.id)
    assert list(df["step"]) == [*range(12), 20]
    # the stored value was not overwritten by the conflicting payload
    assert df.loc[df["step"] == 3, "kl_mean"].item() == 3.0


def test_steps_read_back_with_nan_as_missing(db: Database) -> None:
    run = get_or_create_run(db, "proj", "r")
    rows = _rows(range(3))
    rows[1]["kl_mean"] = float("nan")
    rows[2]["kl_p95"] = np.float32(2.5)
    write_steps(db, run.id, rows)
    df = read_steps(db, run.id, start=1)
    assert list(df["step"]) == [1, 2]
    assert math.isnan(df["kl_mean"].iloc[0])
    assert df["kl_p95"].iloc[1] == 2.5
    assert df["status"].tolist() == ["ok", "ok"]
    assert list(read_steps(db, run.id, after=1)["step"]) == [2]


def test_step_rows_with_unknown_columns_are_rejected(db: Database) -> None:
    run = get_or_create_run(db, "proj", "r")
    with pytest.raises(InvalidInput, match="unknown columns"):
        write_steps(db, run.id, [{"step": 1, "wall_time": 1.0, "kl_meen": 1.0}])


def test_list_runs_reports_steps_and_last_kl(db: Database) -> None:
    a = get_or_create_run(db, "proj", "a")
    get_or_create_run(db, "proj", "empty")
    write_steps(db, a.id, _rows([0, 1, 7], kl=0.5))
    set_run_status(db, a.id, "finished")
    df = list_runs(db).set_index("name")
    assert df.loc["a", "n_steps"] == 3
    assert df.loc["a", "last_step"] == 7
    assert df.loc["a", "last_kl"] == pytest.approx(3.5)
    assert df.loc["a", "status"] == "finished"
    assert df.loc["empty", "n_steps"] == 0
    assert math.isnan(df.loc["empty", "last_kl"])


def test_metrics_wide_read(db: Database) -> None:
    run = get_or_create_run(db, "proj", "r")
    n = write_metrics(db, run.id, [(0, "lr", 1e-5), (1, "lr", 2e-5), (1, "loss/policy", 0.3)])
    assert n == 3
    assert write_metrics(db, run.id, [(0, "lr", 1e-5)]) == 0
    wide = read_metrics(db, run.id)
    assert list(wide.columns) == ["step", "loss/policy", "lr"]
    assert wide["lr"].tolist() == [1e-5, 2e-5]
    assert read_metrics(db, run.id, ["lr"], start=1)["lr"].tolist() == [2e-5]


def test_samples_histograms_annotations_round_trip(db: Database) -> None:
    run = get_or_create_run(db, "proj", "r")
    write_samples(
        db,
        run.id,
        [
            {
                "step": 5,
                "seq_index": 0,
                "kind": "top",
                "kl_seq": 2.4,
                "prompt": "Say hi",
                "response": "Good day",
                "tokens": ["Good", " day"],
                "policy_logprobs": [-0.8, -0.4],
                "ref_logprobs": [-1.5, -2.1],
            },
            {
                "step": 5,
                "seq_index": 3,
                "kind": "random",
                "kl_seq": 0.1,
                "policy_logprobs": np.array([-0.1]),
                "ref_logprobs": np.array([-0.2]),
            },
        ],
    )
    samples = read_samples(db, run.id, 5)
    assert [s.kind for s in samples] == ["top", "random"]
    assert samples[0].tokens == ["Good", " day"]
    assert samples[0].ref_logprobs == [-1.5, -2.1]
    assert write_histograms(db, run.id, [(5, [1, 2, 3]), (6, [0, 0, 9])]) == 2
    steps, counts = read_histograms(db, run.id)
    assert steps.tolist() == [5, 6]
    assert counts.sum(axis=1).tolist() == [6, 9]
    add_annotation(db, run.id, 5, "reward model exploited here", author="ana")
    notes = list_annotations(db, run.id)
    assert [(n.step, n.text) for n in notes] == [(5, "reward model exploited here")]
    with pytest.raises(InvalidInput, match="empty"):
        add_annotation(db, run.id, 5, "   ")
    with pytest.raises(NotFound):
        add_annotation(db, 12345, 5, "x")


def test_a_database_that_is_down_raises_database_unavailable_without_password() -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        Database.open("postgresql://klmon:hunter2@127.0.0.1:1/klmon")
    assert "hunter2" not in str(info.value)
    assert "unavailable" in str(info.value)


def test_a_password_in_the_url_query_is_hidden_too() -> None:
    url = "postgresql://klmon@127.0.0.1:1/klmon?password=hunter2&sslmode=disable"
    with pytest.raises(DatabaseUnavailable) as info:
        Database.open(url)
    assert "hunter2" not in str(info.value)
    assert "password=***" in str(info.value) and "sslmode=disable" in str(info.value)


def test_baseline_run_is_checked(db: Database) -> None:
    good = get_or_create_run(db, "proj", "good")
    bad = get_or_create_run(db, "proj", "bad")
    set_baseline_run(db, bad.id, good.id)
    assert get_run(db, bad.id).baseline_run_id == good.id
    with pytest.raises(InvalidInput, match="its own baseline"):
        set_baseline_run(db, bad.id, bad.id)
    with pytest.raises(NotFound, match="baseline run 999"):
        set_baseline_run(db, bad.id, 999)


def test_a_step_frame_reads_back_the_same_through_each_copy_form(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Import step rows go through PostgreSQL's COPY as one block built with numpy from the
    frame's columns when they can (numbers, text of one length; NULLs in a layout of their
    own), else row by row; every form stores the same rows (and SQLite, which has no COPY,
    too)."""
    import pandas as pd

    from monitor.store import _bulk
    from monitor.store.step_writes import COPY_MIN_ROWS, write_step_frame

    n = COPY_MIN_ROWS + 5
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "step": np.arange(n) * 2,
            "wall_time": 1.7e9 + np.arange(n),
            "payload_hash": [f"v2:{i:032x}" for i in range(n)],
            "k3": rng.normal(size=n),
            "n_tokens": rng.integers(1, 2**40, n).astype(float),
            "n_sequences": np.full(n, 8.0),
        }
    )
    gaps = frame.copy()
    gaps.loc[3, "k3"] = np.nan  # NULLs: rows of three layouts
    gaps.loc[[5, 9], "n_tokens"] = np.nan
    gaps.loc[7, "payload_hash"] = None
    mixed = frame.copy()
    mixed.loc[4, "payload_hash"] = "ab" * 32  # text of two lengths: row by row
    blocks: list[bytes | None] = []
    real = _bulk.column_block
    monkeypatch.setattr(_bulk, "column_block", lambda *a: blocks.append(real(*a)) or blocks[-1])
    read, counters, hashes = {}, {}, {}
    for name, f in (("block", frame), ("nulls", gaps), ("rows", mixed)):
        run = get_or_create_run(db, "proj", name)
        assert write_step_frame(db, run.id, f).inserted == n
        read[name] = read_steps(db, run.id).drop(columns="run_id", errors="ignore")
        with db.begin() as conn:
            counters[name] = conn.exec_driver_sql(
                "SELECT n_steps, last_step, last_k3_step, last_kl_mean_step, recent_walls "
                f"FROM runs WHERE id = {run.id}"
            ).one()
            hashes[name] = [
                h
                for (h,) in conn.exec_driver_sql(
                    f"SELECT payload_hash FROM steps WHERE run_id = {run.id} ORDER BY step"
                )
            ]
    # the counters of a COPY from columns are those of the rows written one by one
    assert counters["block"] == counters["nulls"] == counters["rows"]
    assert tuple(counters["block"][:4]) == (n, 2 * (n - 1), 2 * (n - 1), None)
    if db.is_sqlite:
        assert blocks == []
    else:
        # the row-by-row form asks for a block of its tuples first
        assert [b is not None for b in blocks] == [True, True, False, False]
    assert read["block"]["n_tokens"].tolist() == frame["n_tokens"].tolist()
    assert read["block"]["k3"].tolist() == frame["k3"].tolist()
    for column in ("k3", "n_tokens"):
        got, want = read["nulls"][column], gaps[column]
        assert got.isna().tolist() == want.isna().tolist()
        assert got.dropna().tolist() == want.dropna().tolist()
    same = ["step", "wall_time", "status", "n_sequences"]
    assert read["block"][same].equals(read["nulls"][same])
    assert read["block"].equals(read["rows"])
    for name, f in (("block", frame), ("nulls", gaps), ("rows", mixed)):
        assert hashes[name] == [h if isinstance(h, str) else None for h in f["payload_hash"]]


def test_bulk_inserts_stay_within_the_statements_the_driver_caches(db: Database) -> None:
    """insert_rows writes every row, several per statement; on PostgreSQL no statement has
    more parameters than psycopg caches the parse of (``_bulk._PG_CACHED_PARAMS``)."""
    from sqlalchemy import event

    from monitor.store import _bulk

    run = get_or_create_run(db, "proj", "bulk")
    columns = ("run_id", "step", "wall_time", "payload_hash", "status", "ranks_seen")
    rows = [(run.id, s, 1.7e9 + s, f"h{s}", "ok", 1) for s in range(47)]
    widths: list[int] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        for params in parameters if executemany else [parameters]:
            widths.append(len(params))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.begin() as conn:
            assert _bulk.insert_rows(conn, "steps", columns, rows, key=("run_id", "step")) == 47
            assert _bulk.insert_rows(conn, "steps", columns, rows, key=("run_id", "step")) == 0
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert sorted(read_steps(db, run.id)["step"].tolist()) == list(range(47))
    assert max(widths) > len(columns)  # several rows per statement
    if not db.is_sqlite:
        assert max(widths) <= _bulk._PG_CACHED_PARAMS
