"""The outbox lease and the notification cap, with an injected clock (no servers): a claimed
row is skipped by a second claimer until its lease expires and only its holder records a
failure on it; the lease must outlast the delivery deadline; at most ``max_per_rule``
firing notices per (run, rule) per window, the rest held like a silence."""

from __future__ import annotations

import pytest
from support.alerts import TEST_DETECTORS, Clock, ListSender, add_steps, new_run, rules

from monitor.alerts import AlertEngine, AlertSettings
from monitor.errors import ConfigError
from monitor.store import alerts as store

FLAPPY = """
[[rule]]
name = "high-kl"
detector = "threshold"
severity = "critical"
for = 1
keep_firing_for = 1
[rule.params]
level = 1.0
"""


def _outbox_row(db, clock: Clock) -> int:
    run = new_run(db)
    store.enqueue_notifications(
        db, run, [store.OutgoingMessage("email", "s", {"text": "t"})], announced={}, now=clock()
    )
    (row,) = store.list_notifications(db)["id"].tolist()
    return int(row)


def test_a_claimed_row_is_skipped_until_its_lease_expires(db) -> None:
    clock = Clock()
    row = _outbox_row(db, clock)
    (got,) = store.claim_notifications(db, clock(), lease_s=60, claimed_by="a")
    assert got.id == row and got.claimed_by == "a"
    assert store.claim_notifications(db, clock(), lease_s=60, claimed_by="b") == []
    # b may not record a failure on a's row; a may
    assert not store.mark_failed(db, row, error="x", next_attempt_at=clock(), dead=False,
                                 claimed_by="b")  # fmt: skip
    clock.advance(61)  # a died: b takes the row over once the lease expired
    (again,) = store.claim_notifications(db, clock(), lease_s=60, claimed_by="b")
    assert again.id == row and again.claimed_by == "b"
    assert not store.mark_failed(db, row, error="late", next_attempt_at=clock(), dead=False,
                                 claimed_by="a")  # fmt: skip
    assert store.mark_sent(db, row, clock(), claimed_by="b")
    assert store.outbox_counts(db) == {"sent": 1}
    assert store.claim_notifications(db, clock() + 1e6, claimed_by="c") == []


def test_the_outbox_command_shows_who_holds_a_claim(sqlite_url: str) -> None:
    from click.testing import CliRunner

    from monitor.cli import main
    from monitor.store.database import Database

    url = sqlite_url
    db = Database.open(url)
    clock = Clock(now=__import__("time").time())
    _outbox_row(db, clock)
    store.claim_notifications(db, clock(), lease_s=60, claimed_by="host-a:123:beef")
    db.dispose()
    result = CliRunner().invoke(main, ["alerts", "outbox", "--db", url])
    assert result.exit_code == 0, result.output
    assert "pending" in result.output and "(claimed by host-a:123:beef)" in result.output


def test_the_lease_must_outlast_the_delivery_deadline() -> None:
    with pytest.raises(ConfigError, match="KLMON_ALERT_DELIVERY_LEASE=20 must be longer"):
        AlertSettings.from_env(
            {"KLMON_ALERT_DELIVERY_DEADLINE": "30", "KLMON_ALERT_DELIVERY_LEASE": "20"}
        )
    s = AlertSettings.from_env({"KLMON_ALERT_DELIVERY_DEADLINE": "10"})
    assert s.lease_s == 70.0 and s.delivery_workers == 4
    with pytest.raises(ConfigError, match="KLMON_ALERT_DELIVERY_WORKERS='0'"):
        AlertSettings.from_env({"KLMON_ALERT_DELIVERY_WORKERS": "0"})
    with pytest.raises(ConfigError, match="KLMON_ALERT_MAX_PER_RULE='many'"):
        AlertSettings.from_env({"KLMON_ALERT_MAX_PER_RULE": "many"})


def _flapping_engine(db, clock: Clock, sender: ListSender, **settings) -> AlertEngine:
    return AlertEngine(
        db,
        rules(FLAPPY),
        settings=AlertSettings(nodata_after=1e9, **settings),
        clock=clock,
        senders={"email": sender},
        detectors=TEST_DETECTORS,
    )


def test_notices_per_run_and_rule_are_capped_per_window(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = _flapping_engine(db, clock, sender, max_per_rule=2, max_window=3600.0)
    run, other = new_run(db, "flappy"), new_run(db, "other")
    step = 0
    for _ in range(4):  # fires and resolves four times, one pass each way
        for value in (2.0, 0.1):
            add_steps(db, run, step, [value])
            step += 1
            eng.run_once()
            clock.advance(60)
    subjects = [n.subject.split(":")[0] for n in sender.sent]
    assert subjects == ["[klmon] CRITICAL", "[klmon] RESOLVED"] * 2  # episodes 3, 4 held
    assert len(store.list_events(db, run_id=run)) == 4
    assert store.events_to_notify(db) == []  # held ones that resolved are settled, unsent

    add_steps(db, other, 0, [2.0])  # another run's rule has its own count
    eng.run_once()
    assert sender.sent[-1].run_id == other

    add_steps(db, run, step, [2.0])  # fires again while the window is full: held ...
    eng.run_once()
    assert sender.sent[-1].run_id == other
    clock.advance(3600)  # ... and announced once the window has room, still firing
    eng.run_once()
    assert sender.sent[-1].run_id == run and "CRITICAL" in sender.sent[-1].subject


def test_no_cap_with_zero(db) -> None:
    clock, sender = Clock(), ListSender()
    eng = _flapping_engine(db, clock, sender, max_per_rule=0)
    run = new_run(db)
    for i, value in enumerate([2.0, 0.1] * 4):
        add_steps(db, run, i, [value])
        eng.run_once()
    assert len(sender.sent) == 8
