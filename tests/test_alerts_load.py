"""The alert engine under load: every detector judges a step on the same rows whether the
run was quiet or busy when the pass listed it (steps landing between the listing and the
read once got a window without the run's first rows, and ``reference-offset`` fired on
healthy runs), and 8 live healthy runs logging while a watcher evaluates fire nothing."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from support.alerts import Clock, ListSender
from support.db import rows_of

from monitor.alerts import AlertEngine, AlertSettings, load_rules, parse_rules
from monitor.alerts import engine as engine_mod
from monitor.alerts.rules import default_rules_text
from monitor.analytics import DETECTORS
from monitor.simulate import simulate_run
from monitor.store import alerts as store
from monitor.store.alerts import evaluation_cursor, list_events
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps


class Recorder:
    """Wraps the real detectors and records, per (run, detector), the steps of each table
    it was given."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, ...]]] = {}

    def detectors(self) -> dict:
        def wrap(name, fn):
            def call(df: pd.DataFrame, ctx=None, **params):
                self.seen.setdefault(name, []).append(tuple(int(s) for s in df["step"]))
                return fn(df, ctx, **params)

            return call

        return {name: wrap(name, fn) for name, fn in DETECTORS.items()}


def episodes(db: Database, run_id: int) -> list[tuple]:
    ev = list_events(db, run_id=run_id).sort_values(["rule", "start_step"])
    return [(r.rule, int(r.start_step), r.state) for r in ev.itertuples()]


def _pass_after_late_steps(
    db: Database, monkeypatch, name: str, kind: str, *, stale: bool, seed: int
) -> tuple[list[tuple], dict[str, list[tuple[int, ...]]]]:
    """A running run with 300 steps, evaluated; then 20 more steps land after the next pass
    listed the run (``stale``: as quiet, cursor at its last step; else as busy). Returns the
    episodes and the step tables each detector judged in that pass."""
    sim = simulate_run(kind, steps=320, seed=seed)
    rows = rows_of(sim.steps_df)
    now = time.time()
    for r in rows:
        r["wall_time"] = now - (len(rows) - r["step"]) * 0.5
    recorder = Recorder()
    eng = AlertEngine(
        db,
        load_rules(),
        settings=AlertSettings(nodata_after=1e9),
        clock=Clock(now),
        senders={"email": ListSender()},
        detectors=recorder.detectors(),
    )
    run = get_or_create_run(db, "load", name, now=now).id
    write_steps(db, run, rows[:300])
    eng.run_once([run])
    assert evaluation_cursor(db, run) == 299
    # listed quiet (cursor at its last step) with a rule not "ok" (pending, say), which is
    # what makes a pass visit a quiet run before the clock-judged rules are due
    listed = [replace(r, has_open=True) for r in store.runs_to_evaluate(db, [run])]
    assert not listed[0].has_new_steps
    write_steps(db, run, rows[300:])
    recorder.seen.clear()
    with monkeypatch.context() as m:
        if stale:
            m.setattr(engine_mod.alert_store, "runs_to_evaluate", lambda _db, _ids=None: listed)
        report = eng.run_once([run])
    assert report.steps_evaluated == 20
    assert evaluation_cursor(db, run) == 319
    return episodes(db, run), recorder.seen


@pytest.mark.parametrize("kind", ["healthy", "reference_offset"])
def test_quiet_and_busy_listings_judge_late_steps_on_the_same_rows(db, monkeypatch, kind) -> None:
    busy, busy_tables = _pass_after_late_steps(db, monkeypatch, "busy", kind, stale=False, seed=5)
    quiet, quiet_tables = _pass_after_late_steps(db, monkeypatch, "quiet", kind, stale=True, seed=5)
    assert quiet_tables == busy_tables
    (judged,) = quiet_tables["reference_offset"]
    assert judged[:5] == (0, 1, 2, 3, 4)  # the run's first rows are in the window
    assert judged[-20:] == tuple(range(300, 320))
    assert quiet == busy
    offset = [e for e in busy if e[0] == "reference-offset"]
    if kind == "healthy":
        assert busy == []
    else:
        assert offset and offset[0][1] < 10  # judged on the first rows, from the start


#: The default pack plus a rule that is pending most of the time on a healthy run and never
#: fires: a (run, rule) not "ok" is what makes a pass visit a run it listed as quiet.
WOBBLE_RULE = """
[[rule]]
name = "kl-wobble"
detector = "spike"
severity = "info"
for = 1000000
keep_firing_for = 1
[rule.params]
z = 0.5
"""


@pytest.mark.slow
def test_eight_live_healthy_runs_and_a_watcher_fire_nothing(db) -> None:
    """8 runs already 250 steps in log their next healthy simulated steps one or two at a
    time while `alerts watch`'s engine evaluates every 50 ms: no rule fires, and every
    step is evaluated."""
    n_runs, warm, n_steps = 8, 250, 310
    start = time.time()
    rows, runs = [], []
    for i in range(n_runs):
        sim_rows = rows_of(simulate_run("healthy", steps=n_steps, seed=10 + i).steps_df)
        for r in sim_rows:
            r["wall_time"] = start - (warm - r["step"]) * 0.5
        run = get_or_create_run(db, "load", f"healthy-{i}", now=start).id
        write_steps(db, run, sim_rows[:warm])
        rows.append(sim_rows[warm:])
        runs.append(run)
    eng = AlertEngine(
        db,
        parse_rules(default_rules_text() + WOBBLE_RULE),
        settings=AlertSettings(nodata_after=600.0),
        senders={"email": ListSender()},
    )
    writing = threading.Event()
    busy_passes: list[int] = []  # steps evaluated by passes while the writers were logging
    stop = threading.Event()

    def on_pass(report) -> None:
        if writing.is_set() and report.steps_evaluated:
            busy_passes.append(report.steps_evaluated)

    watcher = threading.Thread(
        target=eng.watch, kwargs={"interval": 0.05, "stop": stop, "on_pass": on_pass}
    )
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            rng = np.random.default_rng(i)
            k = 0
            while k < len(rows[i]):
                time.sleep(float(rng.uniform(0.05, 0.3)))
                n = int(rng.integers(1, 3))
                batch = rows[i][k : k + n]
                for r in batch:
                    r["wall_time"] = time.time()
                write_steps(db, runs[i], batch)
                k += n
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(n_runs)]
    watcher.start()
    try:
        writing.set()
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=300)
        writing.clear()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(evaluation_cursor(db, r) == n_steps - 1 for r in runs):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert not errors, errors
    assert len(busy_passes) >= 3, busy_passes  # the watcher raced the writers
    assert [evaluation_cursor(db, r) for r in runs] == [n_steps - 1] * n_runs
    fired = list_events(db, run_id=runs)
    fired = fired[fired["state"] != "pending"]
    assert fired.empty, fired[["run_name", "rule", "start_step", "message"]].to_string()


def test_extra_metrics_are_joined_on_the_head_and_the_tail(db) -> None:
    """The detectors get the extra metrics they read (TRL's clipped ratio) on every row of
    the window, the run's first rows included, read over the head's and the tail's ranges."""
    from monitor.analytics import EXTRA_METRIC_SUFFIXES
    from monitor.store.steps import write_metrics

    name = "completions" + EXTRA_METRIC_SUFFIXES[0]
    sim = simulate_run("healthy", steps=2000, seed=1)
    rows = rows_of(sim.steps_df)
    run = get_or_create_run(db, "load", "trl", now=time.time()).id
    write_steps(db, run, rows)
    write_metrics(db, run, [(r["step"], name, r["step"] / 1e4) for r in rows])
    eng = AlertEngine(
        db,
        load_rules(),
        settings=AlertSettings(nodata_after=1e9),
        clock=Clock(time.time()),
        senders={"email": ListSender()},
    )
    eng.run_once([run])
    write_steps(db, run, [{**rows[-1], "step": 2000}])
    write_metrics(db, run, [(2000, name, 0.2)])
    df = eng._read_window(store.runs_to_evaluate(db, [run])[0])
    steps = df["step"].to_numpy()
    assert steps[0] == 0 and steps[-1] == 2000 and len(df) < 2000  # head + tail, a gap
    assert np.allclose(df[name].to_numpy(), np.where(steps == 2000, 0.2, steps / 1e4))
