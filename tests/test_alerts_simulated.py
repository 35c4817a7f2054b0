"""The engine on simulated runs (monitor.simulate) with the real detectors and the default
rule pack: steps arriving a few at a time give the same episodes as one pass over the
whole run (the engine reads only the head and tail windows the detectors need), and a
drifting run fires its rule near the failure's onset with one email."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from support.alerts import T0, Clock, ListSender
from support.db import rows_of

from monitor.alerts import AlertEngine, AlertSettings, load_rules
from monitor.alerts import engine as engine_mod
from monitor.simulate import simulate_run
from monitor.store.alerts import list_events
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps


def episodes(db: Database, run_id: int) -> list[tuple]:
    ev = list_events(db, run_id=run_id).sort_values(["rule", "start_step"])
    return [
        (r.rule, int(r.start_step), _i(r.fired_step), _i(r.end_step), r.state)
        for r in ev.itertuples()
    ]


def _i(x: object) -> int | None:
    return None if pd.isna(x) else int(x)


@pytest.mark.parametrize("kind", ["budget", "entropy_collapse", "reward_hacking", "rollout_gap"])
def test_incremental_evaluation_equals_one_pass(sqlite_db, kind, monkeypatch) -> None:
    # the smallest windows the detectors' own lookbacks allow, so the head + tail reads
    # (not a whole short run) are what is tested
    monkeypatch.setattr(engine_mod, "MIN_TAIL_ROWS", 0)
    monkeypatch.setattr(engine_mod, "MIN_HEAD_ROWS", 0)
    sim = simulate_run(kind, steps=600, seed=3)
    rules = load_rules()
    settings = AlertSettings(nodata_after=1e9)
    rows = rows_of(sim.steps_df)
    whole = get_or_create_run(sqlite_db, "sim", f"{kind}-whole", config=sim.config, now=T0)
    live = get_or_create_run(sqlite_db, "sim", f"{kind}-live", config=sim.config, now=T0)
    for run in (whole, live):
        from monitor.store.runs import set_run_status

        set_run_status(sqlite_db, run.id, "finished", now=T0)

    def make() -> AlertEngine:
        return AlertEngine(
            sqlite_db, rules, settings=settings, clock=Clock(), senders={"email": ListSender()}
        )

    eng = make()
    assert eng.tail_rows < 300 and 0 < eng.head_rows < 200
    write_steps(sqlite_db, whole.id, rows)
    eng.run_once([whole.id])

    rng = np.random.default_rng(0)
    i = 0
    while i < len(rows):
        n = int(rng.integers(1, 80))
        write_steps(sqlite_db, live.id, rows[i : i + n])
        make().run_once([live.id])  # a fresh engine each time: state comes from the database
        i += n
    got, want = episodes(sqlite_db, live.id), episodes(sqlite_db, whole.id)
    assert got == want
    assert any(rule for rule, *_ in want)


def test_a_drifting_simulated_run_fires_its_rule_near_onset_with_one_email(sqlite_db) -> None:
    sim = simulate_run("budget", steps=400, seed=1)
    run = get_or_create_run(sqlite_db, "sim", "live", config=sim.config, now=T0)
    sender = ListSender()
    clock = Clock(T0)
    eng = AlertEngine(
        sqlite_db,
        load_rules(),
        settings=AlertSettings(nodata_after=1e9),
        clock=clock,
        senders={"email": sender},
    )
    rows = rows_of(sim.steps_df)
    fired_at = None
    for i in range(0, len(rows), 25):
        write_steps(sqlite_db, run.id, rows[i : i + 25])
        report = eng.run_once()
        hits = [t.step for t in report.fired if t.rule == "kl-over-budget"]
        if hits and fired_at is None:
            fired_at = hits[0]
        clock.advance(60)
    assert fired_at is not None and sim.onset <= fired_at <= sim.onset + 30
    budget_mails = [n for n in sender.sent if "kl-over-budget" in n.subject]
    assert len(budget_mails) >= 1
    assert len({n.id for n in sender.sent}) == len(sender.sent)
