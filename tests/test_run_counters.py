"""The run counters (n_steps, last_step, the last step of each KL column and of reward_mean,
the wall times of the latest steps) that list_runs and the Runs page read
stay equal to a count of the stored steps through every way steps are written or removed:
replays, conflicts, multi-rank merges (partial, then complete, then a rank's bad input),
imports, direct recounts and run deletion; migrations 0006, 0010 and 0012 backfill them from
the steps. The Runs page's stall verdicts from the kept wall times equal those from the
latest step rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import text

from monitor import divergence
from monitor.dashboard.data import DashboardData
from monitor.store.current_kl import KL_PREFERENCE, current_kl
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.run_counters import RECENT_STEPS, recent_walls, recount
from monitor.store.run_list import LAST_STEP_COLUMNS
from monitor.store.runs import delete_run, get_or_create_run, list_runs, run_summaries
from monitor.store.schema import upgrade
from monitor.store.step_writes import StepRecord, write_step_records, write_steps

COUNTERS = ("n_steps", "last_step", *LAST_STEP_COLUMNS.values())


def _counters(db: Database, run_id: int) -> dict[str, object]:
    with db.begin() as conn:
        row = conn.execute(
            text(f"SELECT {', '.join(COUNTERS)} FROM runs WHERE id = :r"), {"r": run_id}
        ).one()
    return dict(zip(COUNTERS, row, strict=True))


def _counted(db: Database, run_id: int) -> dict[str, object]:
    """The counters as a full count of the steps would give them."""
    parts = ["COUNT(*)", "MAX(step)"] + [
        f"MAX(CASE WHEN {c} IS NOT NULL THEN step END)" for c in LAST_STEP_COLUMNS
    ]
    with db.begin() as conn:
        row = conn.execute(
            text(f"SELECT {', '.join(parts)} FROM steps WHERE run_id = :r"), {"r": run_id}
        ).one()
    return dict(zip(COUNTERS, row, strict=True))


def _latest_walls(db: Database, run_id: int) -> list[tuple[int, float]]:
    """(step, wall_time) of the run's RECENT_STEPS latest stored steps, newest first."""
    with db.begin() as conn:
        rows = conn.execute(
            text("SELECT step, wall_time FROM steps WHERE run_id = :r ORDER BY step DESC LIMIT :n"),
            {"r": run_id, "n": RECENT_STEPS},
        ).all()
    return [(int(s), float(w)) for s, w in rows]


def _assert_counted(db: Database, run_id: int) -> None:
    assert _counters(db, run_id) == _counted(db, run_id)
    kept = recent_walls(db, [run_id]).get(run_id, [])
    assert [(s, float(w)) for s, w in kept] == _latest_walls(db, run_id)


def test_the_kept_columns_are_the_kl_preference_and_the_reward() -> None:
    assert tuple(LAST_STEP_COLUMNS) == (*KL_PREFERENCE, "reward_mean")


def test_single_rank_writes_replays_and_conflicts(db: Database) -> None:
    run = get_or_create_run(db, "p", "single")
    assert _counters(db, run.id)["n_steps"] == 0
    rows = [
        {"step": s, "wall_time": float(s), "kl_mean": 0.1 * s, "payload_hash": f"h{s}"}
        for s in range(10)
    ]
    write_steps(db, run.id, rows)
    write_steps(db, run.id, rows)  # a replay counts nothing
    conflict = write_steps(db, run.id, [{**rows[3], "payload_hash": "other"}])
    assert conflict.conflicts == (3,)
    # steps below the last one, and one with only k3 above it
    write_steps(db, run.id, [{"step": 20, "wall_time": 20.0, "k3": 0.5}])
    write_steps(
        db, run.id, [{"step": 15, "wall_time": 15.0, "kl_mean": 2.0, "k1": -0.1, "reward_mean": 3}]
    )
    _assert_counted(db, run.id)
    assert _counters(db, run.id)["n_steps"] == 12
    assert _counters(db, run.id)["last_step"] == 20
    assert _counters(db, run.id)["last_kl_mean_step"] == 15
    assert _counters(db, run.id)["last_reward_mean_step"] == 15
    listed = run_summaries(db)[0]  # the values the counters point at
    assert (listed["last_wall"], listed["last_reward"], listed["last_kl"]) == (20.0, 3.0, 2.0)


def _record(step: int, rank: int, *, rewards: bool = False) -> StepRecord:
    rng = np.random.default_rng(step * 10 + rank)
    p = rng.normal(-1.0, 0.1, size=(4, 8))
    extra = {"rewards": np.ones(4)} if rewards else {}
    return StepRecord(
        step,
        float(step),
        f"h{step}.{rank}",
        rank=rank,
        partials=divergence.partials(p, p - 0.1, **extra),
    )


def test_multi_rank_partial_then_complete_then_rejected(db: Database) -> None:
    run = get_or_create_run(db, "p", "ranks", world_size=2)
    write_step_records(db, run.id, [_record(s, 0) for s in range(5)], world_size=2)
    _assert_counted(db, run.id)
    assert _counters(db, run.id)["n_steps"] == 5  # partial steps are stored steps
    write_step_records(db, run.id, [_record(s, 1) for s in range(5)], world_size=2)
    write_step_records(db, run.id, [_record(s, 1) for s in range(5)], world_size=2)
    _assert_counted(db, run.id)
    assert _counters(db, run.id)["n_steps"] == 5
    # step 5: rank 0 alone, then rank 1 with rewards that rank 0 lacks: the ranks do not
    # merge, the step is rejected and loses its KL
    write_step_records(db, run.id, [_record(5, 0)], world_size=2)
    assert _counters(db, run.id)["last_kl_mean_step"] == 5
    write_step_records(db, run.id, [_record(5, 1, rewards=True)], world_size=2)
    _assert_counted(db, run.id)
    assert _counters(db, run.id)["last_kl_mean_step"] == 4
    now = current_kl(db, run.id)
    listed = run_summaries(db)[0]
    assert now is not None and listed["kl_step"] == now.step == 4
    assert listed["last_kl"] == now.value


def test_recount_repairs_steps_written_behind_the_writers_back(db: Database) -> None:
    run = get_or_create_run(db, "p", "direct")
    write_steps(db, run.id, [{"step": s, "wall_time": 1.0, "k3": 0.01 * s} for s in range(6)])
    with db.begin() as conn:
        conn.execute(text("DELETE FROM steps WHERE run_id = :r AND step >= 3"), {"r": run.id})
    # list_runs still tells the truth about the KL (it looks a vanished step up) ...
    listed = run_summaries(db)[0]
    assert listed["kl_step"] == 2 and listed["kl_quantity"] == "k3"
    # ... and recount puts the counters right
    with db.begin() as conn:
        recount(conn, db.paramstyle, [run.id])
    _assert_counted(db, run.id)


def test_list_runs_reads_the_counters_and_agrees_with_current_kl(db: Database) -> None:
    a = get_or_create_run(db, "p", "a")
    b = get_or_create_run(db, "p", "b")
    get_or_create_run(db, "p", "empty")
    write_steps(db, a.id, [{"step": s, "wall_time": 1.0, "kl_mean": float(s)} for s in range(4)])
    write_steps(db, a.id, [{"step": 9, "wall_time": 1.0, "k3": 0.2}])  # kl_mean stays best
    write_steps(db, b.id, [{"step": s, "wall_time": 1.0, "k1": -s / 10} for s in range(3)])
    df = list_runs(db)
    assert list(df["name"]) == ["a", "b", "empty"]
    assert list(df["n_steps"]) == [5, 3, 0]
    assert df["last_step"].tolist()[:2] == [9, 2] and df["last_step"].isna().tolist()[2]
    for rid, row in zip(df["id"], df.itertuples(), strict=True):
        now = current_kl(db, int(rid))
        if now is None:
            assert np.isnan(row.last_kl) and pd.isna(row.kl_quantity)
        else:
            assert (row.last_kl, row.kl_step, row.kl_quantity, row.kl_unit) == (
                now.value,
                now.step,
                now.quantity.name,
                now.quantity.unit,
            )


def test_deleting_a_run_deletes_its_counters(db: Database) -> None:
    a = get_or_create_run(db, "p", "gone")
    write_steps(db, a.id, [{"step": 0, "wall_time": 1.0, "kl_mean": 1.0}])
    delete_run(db, a.id)
    b = get_or_create_run(db, "p", "gone")  # same name again: starts from nothing
    assert _counters(db, b.id)["n_steps"] == 0 and _counters(db, b.id)["last_step"] is None


def test_migration_0006_backfills_from_existing_steps(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0005")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags) VALUES (1, 'p', 'old', 'finished', 'live', 0, 0, 1, "
                "'{}', '[]'), (2, 'p', 'none', 'finished', 'live', 0, 0, 1, '{}', '[]')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO steps (run_id, step, wall_time, status, ranks_seen, kl_mean, k3) "
                "VALUES (1, 0, 0, 'ok', 1, 0.5, 0.1), (1, 1, 0, 'ok', 1, NULL, 0.2), "
                "(1, 7, 0, 'ok', 1, NULL, NULL)"
            )
        )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    assert _counters(db, 1) == {
        "n_steps": 3,
        "last_step": 7,
        "last_kl_mean_step": 0,
        "last_k3_step": 1,
        "last_k1_step": None,
        "last_k2_step": None,
        "last_reward_mean_step": None,
    }
    assert _counters(db, 2)["n_steps"] == 0 and _counters(db, 2)["last_step"] is None


def test_migration_0010_backfills_the_last_reward_step(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags, n_steps, last_step) VALUES (1, 'p', 'old', "
                "'finished', 'live', 0, 0, 1, '{}', '[]', 3, 7), (2, 'p', 'none', 'finished', "
                "'live', 0, 0, 1, '{}', '[]', 1, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO steps (run_id, step, wall_time, status, ranks_seen, reward_mean) "
                "VALUES (1, 0, 0, 'ok', 1, 0.5), (1, 4, 0, 'ok', 1, 0.7), "
                "(1, 7, 0, 'ok', 1, NULL), (2, 0, 0, 'ok', 1, NULL)"
            )
        )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    assert _counters(db, 1)["last_reward_mean_step"] == 4
    assert _counters(db, 2)["last_reward_mean_step"] is None
    assert [r["last_reward"] for r in run_summaries(db)] == [0.7, None]


def test_imports_and_their_replays_keep_the_counters(db: Database) -> None:
    from monitor.ingest.importers.importer import import_path

    fixtures = Path(__file__).parent / "fixtures" / "import"
    for name in ("trl_ppo.trainer_state.json", "steps.csv"):
        first = import_path(db, fixtures / name, project="imp", name=name)
        import_path(db, fixtures / name, project="imp", name=name)  # a replay
        _assert_counted(db, first.run.id)
        assert _counters(db, first.run.id)["n_steps"] > 0
        listed = next(r for r in run_summaries(db) if r["id"] == first.run.id)
        now = current_kl(db, first.run.id)
        assert (listed["kl_quantity"], listed["kl_step"]) == (
            (now.quantity.name, now.step) if now else (None, None)
        )


def test_stall_verdicts_from_the_kept_wall_times_equal_those_from_the_step_rows(
    db: Database,
) -> None:
    """Irregular intervals, steps written out of order and older steps imported after newer
    ones, a multi-rank run: the Runs page (kept wall times) and a run's header (its latest
    step rows) call each run stalled or running alike, just before and after each limit."""
    rng = np.random.default_rng(7)
    runs = []
    for i, scale in enumerate((1.0, 40.0, 90.0)):  # stall limits: the floor, then 10 x median
        run = get_or_create_run(db, "p", f"irregular{i}")
        steps = rng.permutation(60)
        walls = np.cumsum(rng.exponential(scale, 60))
        for chunk in np.array_split(steps, 7):  # newer steps first, older ones after
            write_steps(
                db,
                run.id,
                [{"step": int(s), "wall_time": float(walls[s]), "k3": 0.1} for s in chunk],
            )
        runs.append(run.id)
    imported = get_or_create_run(db, "p", "imported")
    write_steps(db, imported.id, [{"step": s, "wall_time": 100.0 + 50 * s} for s in range(30, 40)])
    write_steps(db, imported.id, [{"step": s, "wall_time": 3.0 * s} for s in range(30)])
    ranks = get_or_create_run(db, "p", "ranks", world_size=2)
    write_step_records(db, ranks.id, [_record(s, 0) for s in range(30)], world_size=2)
    write_step_records(db, ranks.id, [_record(s, 1) for s in range(25)], world_size=2)
    one = get_or_create_run(db, "p", "one step")
    write_steps(db, one.id, [{"step": 0, "wall_time": 5.0}])
    runs += [imported.id, ranks.id, one.id]
    with db.begin() as conn:  # heard from at its last step only
        conn.execute(text("UPDATE runs SET last_seen_at = 0"))
    for rid in runs:
        _assert_counted(db, rid)
    verdicts = set()
    for rid in runs:
        header = DashboardData(db).run_state(rid)
        heard = header.last_wall
        limit = max(300.0, 10 * (header.median_interval or 0.0))
        for now in (heard + limit - 1e-3, heard + limit + 1e-3, heard + 2 * limit):
            page = DashboardData(db, clock=lambda now=now: now)
            listed = page.runs_overview().set_index("id")["status"]
            assert listed[rid] == page.run_state(rid).status
            verdicts.add(listed[rid])
    assert verdicts == {"running", "stalled"}


def test_migration_0012_backfills_the_latest_wall_times(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0010")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags, n_steps, last_step) VALUES (1, 'p', 'long', "
                "'running', 'live', 0, 0, 1, '{}', '[]', 30, 29), (2, 'p', 'none', 'running', "
                "'live', 0, 0, 1, '{}', '[]', 0, NULL)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO steps (run_id, step, wall_time, status, ranks_seen) "
                "VALUES (1, :s, :w, 'ok', 1)"
            ),
            [{"s": s, "w": float(s * s)} for s in range(30)],
        )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    kept = recent_walls(db, [1, 2])
    assert list(kept) == [1]
    assert kept[1] == [(s, float(s * s)) for s in range(29, 29 - RECENT_STEPS, -1)]
    # and the writers carry on from the backfilled value
    write_steps(db, 1, [{"step": 30, "wall_time": 900.0}])
    _assert_counted(db, 1)


def test_the_stall_median_is_numpys_median_of_the_finite_forward_gaps() -> None:
    """The Runs page takes the median step interval in plain Python for every running run:
    it equals numpy's median of the gaps that are finite and do not go back in time."""
    from monitor.dashboard.data import _median_interval

    rng = np.random.default_rng(3)
    for _ in range(500):
        walls = np.sort(rng.exponential(10.0, rng.integers(0, 22)) * rng.choice([1e-3, 1e3]))
        walls = walls[::-1].copy()
        odd = rng.random(len(walls)) < 0.15
        walls[odd] = rng.choice([np.nan, np.inf, 1.7e9], odd.sum())
        with np.errstate(invalid="ignore"):  # inf - inf
            gaps = walls[:-1] - walls[1:]
        gaps = gaps[np.isfinite(gaps) & (gaps >= 0)]
        want = float(np.median(gaps)) if len(gaps) else None
        assert _median_interval([(0, w) for w in walls.tolist()]) == want
