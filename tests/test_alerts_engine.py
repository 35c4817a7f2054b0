"""The alert engine on SQLite and PostgreSQL: a synthetic series, an injected clock, a
recording sender. pending -> firing after `for` steps, resolve after keep_firing_for,
restart without duplicates, silences, no data, detector errors, the outbox."""

from __future__ import annotations

import pandas as pd
import pytest
from support.alerts import (
    T0,
    Clock,
    ListSender,
    add_steps,
    engine,
    new_run,
)

from monitor.store import alerts as store
from monitor.store.alerts import acknowledge_event, list_events, list_rule_states, silence
from monitor.store.runs import set_run_status, touch_run


def states(db, run_id) -> dict[str, str]:
    df = list_rule_states(db, run_id)
    return dict(zip(df["rule"], df["state"], strict=True))


def test_pending_firing_resolved_step_by_step(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = engine(db, clock, sender)
    run = new_run(db)
    add_steps(db, run, 0, [0.5] * 5)
    report = eng.run_once()
    assert report.steps_evaluated == 5 and not report.transitions
    assert store.evaluation_cursor(db, run) == 4

    # two steps above: pending, not yet firing (for = 3)
    add_steps(db, run, 5, [1.5, 1.6])
    report = eng.run_once()
    moves = [(t.from_state, t.to_state, t.step) for t in report.transitions]
    assert moves == [("ok", "pending", 5)]
    assert states(db, run) == {"high-kl": "pending"}
    ev = list_events(db, run_id=run)
    assert list(ev["state"]) == ["pending"] and ev["start_step"].iloc[0] == 5

    # a clear step before `for` is reached cancels the episode: never an alert
    add_steps(db, run, 7, [0.5])
    report = eng.run_once()
    assert [(t.from_state, t.to_state) for t in report.transitions] == [("pending", "ok")]
    assert list_events(db, run_id=run).empty
    assert sender.sent == []

    # three in a row: fires at the third
    add_steps(db, run, 8, [1.5, 1.7, 2.5])
    report = eng.run_once()
    assert [(t.to_state, t.step) for t in report.fired] == [("firing", 10)]
    ev = list_events(db, run_id=run).iloc[0]
    assert (ev["state"], ev["start_step"], ev["fired_step"], ev["value"]) == ("firing", 8, 10, 2.5)
    assert ev["threshold"] == 1.0 and ev["causes"] == ["test cause"]
    assert len(sender.sent) == 1
    first = sender.sent[0]
    assert first.subject == "[klmon] CRITICAL: high-kl on proj/ppo"
    assert "kl_mean 2.5 above 1 at step 10" in first.payload["text"]

    # one clear step, then it holds again: clear counter restarts (keep_firing_for = 2)
    add_steps(db, run, 11, [0.5, 1.5, 0.5])
    report = eng.run_once()
    assert report.transitions == [] and states(db, run) == {"high-kl": "firing"}
    add_steps(db, run, 14, [0.5])
    report = eng.run_once()
    assert [(t.to_state, t.step) for t in report.resolved] == [("resolved", 14)]
    ev = list_events(db, run_id=run).iloc[0]
    assert (ev["state"], ev["end_step"], ev["last_step"]) == ("resolved", 14, 12)
    assert len(sender.sent) == 2 and "RESOLVED" in sender.sent[1].subject
    assert states(db, run) == {"high-kl": "ok"}


def test_one_pass_over_a_finished_import_reports_every_episode_in_one_message(db) -> None:
    clock, sender = Clock(), ListSender()
    run = new_run(db, "imported", status="finished", source="import:trl")
    series = [0.5] * 3 + [2.0] * 4 + [0.2] * 3 + [3.0] * 5
    add_steps(db, run, 0, series)
    report = engine(db, clock, sender).run_once()
    assert [t.step for t in report.fired] == [5, 12]
    assert [t.step for t in report.resolved] == [8]
    ev = list_events(db, run_id=run).sort_values("id")
    assert list(ev["state"]) == ["resolved", "firing"]
    assert len(sender.sent) == 1  # one message per run per evaluation
    assert "(+1 more)" in sender.sent[0].subject
    # nothing more to say: a second pass sends nothing
    assert engine(db, clock, sender).run_once().transitions == []
    assert len(sender.sent) == 1


def test_restart_sends_no_duplicate_and_still_delivers_the_resolve(db) -> None:
    clock, sender = Clock(), ListSender()
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    engine(db, clock, sender).run_once()
    assert len(sender.sent) == 1

    restarted = engine(db, clock, sender)  # a new process on the same database
    assert restarted.run_once().transitions == []
    assert len(sender.sent) == 1

    add_steps(db, run, 3, [0.1, 0.1])
    report = engine(db, clock, sender).run_once()
    assert [t.step for t in report.resolved] == [4]
    assert [("RESOLVED" in n.subject) for n in sender.sent] == [False, True]


def test_crash_after_enqueue_is_delivered_once_by_the_next_engine(db) -> None:
    clock, sender = Clock(), ListSender()
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    first = engine(db, clock, sender)
    first.evaluate()
    assert first.notify() == 1  # in the outbox; the process dies before delivering
    assert sender.sent == []
    second = engine(db, clock, sender)
    second.run_once()
    assert len(sender.sent) == 1
    second.run_once()
    engine(db, clock, sender).run_once()
    assert len(sender.sent) == 1


def test_outbox_retries_with_backoff_and_delivers_once(db) -> None:
    clock, sender = Clock(), ListSender()
    sender.fail = True
    eng = engine(db, clock, sender)
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    report = eng.run_once()
    assert report.failed == 1 and report.pending == 1
    out = store.list_notifications(db)
    assert out["attempts"].iloc[0] == 1 and "down" in out["last_error"].iloc[0]

    sender.fail = False
    eng.run_once()  # not due yet: backoff
    assert sender.sent == []
    clock.advance(6)
    report = eng.run_once()
    assert report.sent == 1 and len(sender.sent) == 1
    clock.advance(600)
    eng.run_once()
    assert len(sender.sent) == 1
    assert store.outbox_counts(db) == {"sent": 1}


def test_a_failing_channel_does_not_block_evaluation_of_other_runs(db) -> None:
    clock, sender = Clock(), ListSender()
    sender.fail = True
    eng = engine(db, clock, sender)
    runs = [new_run(db, f"r{i}") for i in range(3)]
    for r in runs:
        add_steps(db, r, 0, [2.0] * 3)
    report = eng.run_once()
    assert sorted(t.run_id for t in report.fired) == runs
    # each notification tried once (in parallel) and waiting for its own retry
    out = store.list_notifications(db)
    assert out["attempts"].tolist() == [1, 1, 1]
    assert set(out["status"]) == {"pending"}


def test_silence_suppresses_notifications_but_tracks_state(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = engine(db, clock, sender)
    run, other = new_run(db, "silenced"), new_run(db, "loud")
    silence(db, run, "high-kl", clock() + 7200, by="alice", reason="known", now=clock())
    add_steps(db, run, 0, [2.0] * 3)
    add_steps(db, other, 0, [2.0] * 3)
    report = eng.run_once()
    assert sorted(t.run_id for t in report.fired) == [run, other]
    assert [n.run_id for n in sender.sent] == [other]
    ev = list_events(db, run_id=run, now=clock())
    assert ev["state"].iloc[0] == "firing" and bool(ev["silenced"].iloc[0])

    # the silence ends while it still fires: announced then
    clock.advance(7201)
    eng.run_once()
    assert [n.run_id for n in sender.sent] == [other, run]


def test_an_episode_that_comes_and_goes_while_silenced_is_never_sent(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = engine(db, clock, sender)
    run = new_run(db)
    silence(db, run, None, clock() + 3600, now=clock())
    add_steps(db, run, 0, [2.0] * 3 + [0.1] * 2)
    report = eng.run_once()
    assert len(report.fired) == 1 and len(report.resolved) == 1
    clock.advance(4000)
    eng.run_once()
    assert sender.sent == []
    assert store.events_to_notify(db) == []


def test_acknowledge_keeps_the_first_and_resolve_still_notifies(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = engine(db, clock, sender)
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    eng.run_once()
    event_id = int(list_events(db)["id"].iloc[0])
    acked = acknowledge_event(db, event_id, "alice", now=clock() + 5)
    assert (acked.acknowledged_by, acked.acknowledged_at) == ("alice", clock() + 5)
    again = acknowledge_event(db, event_id, "bob")
    assert again.acknowledged_by == "alice"
    add_steps(db, run, 3, [0.1, 0.1])
    eng.run_once()
    assert len(sender.sent) == 2


def test_a_stalled_run_goes_to_nodata_and_is_never_resolved(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = engine(db, clock, sender, nodata_after=600.0)
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    touch_run(db, run, now=clock())
    eng.run_once()
    assert states(db, run) == {"high-kl": "firing"}

    clock.advance(601)  # the trainer went silent
    report = eng.run_once()
    assert [(t.from_state, t.to_state) for t in report.transitions] == [("firing", "nodata")]
    assert states(db, run) == {"high-kl": "nodata"}
    ev = list_events(db, run_id=run).iloc[0]
    assert (ev["state"], ev["rule_state"]) == ("firing", "nodata")
    clock.advance(10_000)
    assert eng.run_once().transitions == []
    assert list_events(db, run_id=run)["state"].iloc[0] == "firing"
    assert len(sender.sent) == 1

    # it comes back: the counters continue where they were
    add_steps(db, run, 3, [0.1, 0.1])
    touch_run(db, run, now=clock())
    report = eng.run_once()
    assert ("nodata", "firing") in [(t.from_state, t.to_state) for t in report.transitions]
    assert [t.step for t in report.resolved] == [4]


def test_nodata_message_says_the_last_step_or_that_there_is_none(db) -> None:
    clock = Clock()
    eng = engine(db, clock, nodata_after=60.0)
    empty, logged = new_run(db, "empty"), new_run(db, "logged")
    add_steps(db, logged, 0, [0.1] * 3)
    for run in (empty, logged):
        touch_run(db, run, now=clock())
    eng.run_once()
    clock.advance(61)
    report = eng.run_once()
    said = {t.run_id: t.message for t in report.transitions if t.to_state == "nodata"}
    assert said[empty].endswith("(no step yet)") and "None" not in said[empty]
    assert said[logged].endswith("(last step 2)")


def test_a_finished_run_is_never_nodata(db) -> None:
    clock = Clock()
    eng = engine(db, clock, nodata_after=60.0)
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    set_run_status(db, run, "finished", now=clock())
    clock.advance(10_000)
    eng.run_once()
    assert states(db, run) == {"high-kl": "firing"}


def test_stalled_rule_fires_on_the_clock_and_resolves_with_the_next_step(db) -> None:
    text = """
[[rule]]
name = "run-stalled"
detector = "stalled"
severity = "warning"
[rule.params]
min_seconds = 300.0
"""
    clock, sender = Clock(T0 + 100), ListSender()
    eng = engine(db, clock, sender, text=text, nodata_after=300.0)
    run = new_run(db)
    add_steps(db, run, 0, [0.5] * 10)
    touch_run(db, run, now=T0 + 100)
    assert eng.run_once().transitions == []
    clock.advance(200)
    assert eng.run_once().transitions == []
    clock.advance(200)  # 400 s silent
    report = eng.run_once()
    assert [(t.rule, t.to_state, t.step) for t in report.fired] == [("run-stalled", "firing", 9)]
    assert len(sender.sent) == 1 and "run-stalled" in sender.sent[0].subject
    clock.advance(60)
    assert eng.run_once().transitions == []
    add_steps(db, run, 10, [0.5])
    touch_run(db, run, now=clock())
    report = eng.run_once()
    assert [(t.rule, t.step) for t in report.resolved] == [("run-stalled", 10)]


def test_a_broken_detector_is_an_error_state_and_other_rules_still_work(db) -> None:
    text = """
[[rule]]
name = "high-kl"
detector = "threshold"
for = 1

[[rule]]
name = "broken"
detector = "boom"
"""
    clock, sender = Clock(), ListSender()
    run = new_run(db)
    add_steps(db, run, 0, [2.0])
    report = engine(db, clock, sender, text=text).run_once()
    assert [t.rule for t in report.fired] == ["high-kl"]
    assert ("broken", "error") in [(t.rule, t.to_state) for t in report.transitions]
    assert states(db, run) == {"high-kl": "firing", "broken": "error"}


def test_a_concurrent_evaluation_is_discarded(db) -> None:
    clock = Clock()
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    stale = store.runs_to_evaluate(db, [run])[0]
    engine(db, clock).run_once()
    ok = store.commit_evaluation(db, stale, last_step=2, states=[], events=[], now=clock())
    assert ok is False
    assert len(list_events(db)) == 1
    # the first evaluation of a run races on inserting the cursor row
    other = new_run(db, "other")
    add_steps(db, other, 0, [0.1])
    fresh = store.runs_to_evaluate(db, [other])[0]
    assert store.commit_evaluation(db, fresh, last_step=0, states=[], events=[], now=1.0)
    assert not store.commit_evaluation(db, fresh, last_step=0, states=[], events=[], now=1.0)


def test_notifications_are_enqueued_once_even_if_two_engines_race(db) -> None:
    clock = Clock()
    run = new_run(db)
    add_steps(db, run, 0, [2.0] * 3)
    engine(db, clock).evaluate()
    event_id = int(list_events(db)["id"].iloc[0])
    msg = store.OutgoingMessage("email", "s", {"text": "t"})
    assert store.enqueue_notifications(db, run, [msg], announced={event_id: (True, False)}, now=1)
    assert not store.enqueue_notifications(
        db, run, [msg], announced={event_id: (True, False)}, now=1
    )
    assert len(store.list_notifications(db)) == 1


def test_rejected_steps_do_not_break_a_pending_streak(db) -> None:
    clock = Clock()
    run = new_run(db)
    add_steps(db, run, 0, [2.0, 2.0])
    add_steps(db, run, 2, [float("nan")], status="rejected", reject_reason="NaN log-probs")
    add_steps(db, run, 3, [2.0])
    report = engine(db, clock).run_once()
    assert [t.step for t in report.fired] == [3]


def test_big_backlog_is_evaluated_in_chunks_with_the_same_result(db) -> None:
    clock = Clock()
    values = ([0.5] * 7 + [2.0] * 5) * 10
    a, b = new_run(db, "whole"), new_run(db, "chunked")
    add_steps(db, a, 0, values)
    add_steps(db, b, 0, values)
    whole = engine(db, clock)
    whole.run_once([a])
    chunked = engine(db, clock)
    chunked.chunk_rows = 7
    chunked.run_once([b])
    cols = ["rule", "state", "start_step", "fired_step", "end_step"]
    ev_a = list_events(db, run_id=a).sort_values("start_step")[cols].reset_index(drop=True)
    ev_b = list_events(db, run_id=b).sort_values("start_step")[cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(ev_a, ev_b)
    assert len(ev_a) == 10
    assert store.evaluation_cursor(db, b) == len(values) - 1


def test_list_events_filters_and_columns(db) -> None:
    clock = Clock()
    r1, r2 = new_run(db, "a"), new_run(db, "b")
    add_steps(db, r1, 0, [2.0] * 3 + [0.1] * 2)
    add_steps(db, r2, 0, [2.0] * 3)
    engine(db, clock).run_once()
    df = list_events(db)
    assert list(df.columns) == list(store.EVENT_COLUMNS)
    assert set(df["run_name"]) == {"a", "b"}
    assert list(list_events(db, state="firing")["run_id"]) == [r2]
    assert list(list_events(db, state="resolved")["run_id"]) == [r1]
    assert len(list_events(db, state="open")) == 1
    assert list(list_events(db, run_id=r1)["run_id"]) == [r1]
    assert len(list_events(db, severity="critical")) == 2
    with pytest.raises(Exception, match="not one of"):
        list_events(db, state="burning")
