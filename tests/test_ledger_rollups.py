"""Power-of-two rollups of the token ledger: long-range reads answer from stored buckets with
exact masses, exact sums for the ids that carry the range, bounded ones for the rest, and
stay right when a step below the rolled-up frontier is written."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from monitor.store import (
    Database,
    read_token_ledger,
    read_token_ledger_buckets,
    refresh_ledger_rollups,
    token_changes,
    upgrade,
)
from monitor.store.engine import make_engine
from monitor.store.ledger_rollups import BASE_LEVEL, RAW_MAX_STEPS, range_pieces
from monitor.store.runs import get_or_create_run
from monitor.store.step_writes import _insert_ledgers

N_STEPS = 3 * RAW_MAX_STEPS + 77  # several base buckets, an unaligned end, a tail
HEAVY = (5, 9)  # ids in every step's top rows, growing over the run


def step_ledger(step: int, rng: np.random.Generator) -> dict[str, Any]:
    """Two heavy ids, a few light ones from a wide vocabulary, one negative id."""
    light = rng.choice(np.arange(100, 5000), 6, replace=False)
    ids = [*HEAVY, *light.tolist(), 7]
    sums = [0.5 + step / 1000, 0.2, *(rng.uniform(0.001, 0.01, 6)).tolist(), -0.3]
    counts = [3, 2, *([1] * 6), 4]
    order = np.argsort(ids)
    return {
        "ids": [ids[i] for i in order],
        "counts": [counts[i] for i in order],
        "sums": [sums[i] for i in order],
        "n": 40,
        "pos": float(sum(s for s in sums if s > 0) + 0.05),
        "neg": -0.35,
    }


def write(db: Database, run_id: int, ledgers: list[tuple[int, dict[str, Any]]]) -> None:
    with db.begin() as conn:
        _insert_ledgers(db, conn, run_id, ledgers, replace=True)


@pytest.fixture
def long_run(db: Database) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
    rng = np.random.default_rng(0)
    run = get_or_create_run(db, "p", "long")
    ledgers = [(s, step_ledger(s, rng)) for s in range(N_STEPS)]
    write(db, run.id, ledgers)
    return run.id, ledgers


def brute(ledgers, lo: int, hi: int) -> tuple[pd.DataFrame, dict[str, float]]:
    rows = [
        (i, c, x)
        for s, d in ledgers
        if lo <= s <= hi
        for i, c, x in zip(d["ids"], d["counts"], d["sums"], strict=True)
    ]
    df = pd.DataFrame(rows, columns=["token_id", "count", "lr_sum"]).groupby("token_id").sum()
    inside = [d for s, d in ledgers if lo <= s <= hi]
    masses = {
        "pos_mass": sum(d["pos"] for d in inside),
        "neg_mass": sum(d["neg"] for d in inside),
        "n_tokens": sum(d["n"] for d in inside),
        "n_steps": len(inside),
    }
    return df, masses


def test_range_pieces_cover_the_range_once() -> None:
    done = {BASE_LEVEL: 40, BASE_LEVEL + 1: 19, BASE_LEVEL + 2: 9, BASE_LEVEL + 3: 3}
    for lo, hi in [(5, 2700), (0, 2623), (64, 5000), (130, 131 + RAW_MAX_STEPS)]:
        p = range_pieces(lo, hi, done)
        covered = [s for a, b in p.raw for s in range(a, b + 1)]
        covered += [s for lv, b in p.buckets for s in range(b << lv, (b + 1) << lv)]
        assert sorted(covered) == list(range(lo, hi + 1))
        assert all(b <= done[lv] for lv, b in p.buckets)
        # at most two buckets per level, plus the top level's run of buckets
        assert len(p.buckets) <= 2 * len(done) + (hi - lo) // (1 << max(done))
    assert range_pieces(0, RAW_MAX_STEPS - 1, done).buckets == []


def test_long_range_reads_use_rollups_with_exact_masses(db: Database, long_run) -> None:
    run_id, ledgers = long_run
    lo, hi = 3, N_STEPS - 1
    top = read_token_ledger(db, run_id, lo, hi, k=4)
    with db.begin() as conn:
        n_rollups = conn.execute(text("SELECT COUNT(*) FROM token_ledger_rollups")).scalar()
    assert n_rollups > 0  # built lazily by the read
    want, masses = brute(ledgers, lo, hi)
    assert top.attrs["n_steps"] == masses["n_steps"]
    assert top.attrs["n_tokens"] == masses["n_tokens"]
    assert top.attrs["pos_mass"] == pytest.approx(masses["pos_mass"], rel=1e-12)
    assert top.attrs["neg_mass"] == pytest.approx(masses["neg_mass"], rel=1e-12)
    assert list(top["token_id"][:2]) == list(HEAVY)
    for i in HEAVY:  # ids carrying the range: exact
        row = top.set_index("token_id").loc[i]
        assert row["count"] == want.loc[i, "count"]
        assert row["lr_sum"] == pytest.approx(want.loc[i, "lr_sum"], rel=1e-12)
        assert row["n_steps"] == masses["n_steps"]
    for _, row in top.iloc[2:].iterrows():  # light ids: bounded by the raw sums
        assert 0 < row["lr_sum"] <= want.loc[row["token_id"], "lr_sum"] + 1e-12
    neg = read_token_ledger(db, run_id, lo, hi, k=1, side="neg")
    assert neg["token_id"].tolist() == [7]
    assert neg["lr_sum"].iloc[0] == pytest.approx(want.loc[7, "lr_sum"], rel=1e-12)
    short = read_token_ledger(db, run_id, 10, 10 + RAW_MAX_STEPS - 1, k=50)
    want_short, _ = brute(ledgers, 10, 10 + RAW_MAX_STEPS - 1)
    exact = want_short[want_short["lr_sum"] > 0].sort_values("lr_sum", ascending=False)
    assert short["token_id"].tolist()[:10] == exact.index.tolist()[:10]  # raw: as before


def test_long_range_buckets_and_changes(db: Database, long_run) -> None:
    run_id, ledgers = long_run
    lo, hi = 1, N_STEPS - 1
    df = read_token_ledger_buckets(db, run_id, lo, hi, n_buckets=8, k=2)
    buckets = df.attrs["buckets"]
    assert buckets["step_lo"].iloc[0] == lo and buckets["step_hi"].iloc[-1] == hi
    assert (buckets["step_lo"].iloc[1:].to_numpy() == buckets["step_hi"].iloc[:-1] + 1).all()
    assert (buckets["step_lo"].iloc[1:] % (1 << BASE_LEVEL) == 0).all()  # rounded inner edges
    for _, b in buckets.iterrows():
        want, masses = brute(ledgers, int(b["step_lo"]), int(b["step_hi"]))
        assert b["n_tokens"] == masses["n_tokens"]
        assert b["pos_mass"] == pytest.approx(masses["pos_mass"], rel=1e-12)
        got = df[df["bucket"] == b["bucket"]].set_index("token_id")
        for i in HEAVY:
            assert got.loc[i, "lr_sum"] == pytest.approx(want.loc[i, "lr_sum"], rel=1e-12)
            assert got.loc[i, "count"] == want.loc[i, "count"]
    ch = token_changes(db, run_id, 2 * RAW_MAX_STEPS, N_STEPS - 1, window=RAW_MAX_STEPS + 5, k=3)
    assert ch["token_id"].iloc[0] == HEAVY[0]  # its sum grows with the step


def test_a_write_below_the_frontier_invalidates_the_rollups(db: Database, long_run) -> None:
    run_id, ledgers = long_run
    assert refresh_ledger_rollups(db, run_id) > 0
    assert refresh_ledger_rollups(db, run_id) == 0  # nothing left to build
    step, d = ledgers[200]
    bumped = {
        **d,
        "sums": [
            x + 100.0 if i == 42 or x == d["sums"][0] else x
            for i, x in zip(d["ids"], d["sums"], strict=True)
        ],
    }
    bumped["ids"] = [*d["ids"]]
    bumped["pos"] = d["pos"] + 100.0
    write(db, run_id, [(step, bumped)])
    ledgers[200] = (step, bumped)
    top = read_token_ledger(db, run_id, 0, N_STEPS - 1, k=2)
    want, masses = brute(ledgers, 0, N_STEPS - 1)
    assert top.attrs["pos_mass"] == pytest.approx(masses["pos_mass"], rel=1e-12)
    row = top.set_index("token_id").loc[HEAVY[0]]
    assert row["lr_sum"] == pytest.approx(want.loc[HEAVY[0], "lr_sum"], rel=1e-12)


def test_migration_0011_upgrades_from_0007_with_a_ledger(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine, "0007")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, project, name, status, source, created_at, last_seen_at, "
                "world_size, config, tags, n_steps) VALUES (1, 'p', 'old', 'finished', 'live', "
                "0, 0, 1, '{}', '[]', 1)"
            )
        )
        for s in range(2 * RAW_MAX_STEPS):
            conn.execute(
                text(
                    "INSERT INTO token_ledger_steps (run_id, step, n_tokens, pos_mass, neg_mass)"
                    " VALUES (1, :s, 10, 1.0, 0.0)"
                ),
                {"s": s},
            )
            conn.execute(
                text(
                    "INSERT INTO token_ledger (run_id, step, token_id, count, lr_sum) "
                    "VALUES (1, :s, 3, 2, 0.5)"
                ),
                {"s": s},
            )
    upgrade(engine)
    engine.dispose()
    db = Database.open(empty_db_url)
    top = read_token_ledger(db, 1)  # the whole run: built from the rows stored before
    assert top["token_id"].tolist() == [3]
    assert top["count"].iloc[0] == 4 * RAW_MAX_STEPS
    assert top.attrs["n_steps"] == 2 * RAW_MAX_STEPS
    with db.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM token_ledger_rollup_masses")).scalar()
    db.dispose()


def test_two_readers_building_the_same_buckets(db: Database, long_run) -> None:
    """Dashboard workers may refresh one run at once: building buckets already stored (the
    frontier read before the other's commit) stores nothing twice and fails nothing."""
    from monitor.store.ledger_rollups import _build

    run_id, _ = long_run
    refresh_ledger_rollups(db, run_id)
    with db.begin() as conn:
        before = conn.execute(text("SELECT COUNT(*) FROM token_ledger_rollups")).scalar()
        _build(conn, run_id, BASE_LEVEL, 0, 3)
        _build(conn, run_id, BASE_LEVEL + 1, 0, 1)
        assert conn.execute(text("SELECT COUNT(*) FROM token_ledger_rollups")).scalar() == before
