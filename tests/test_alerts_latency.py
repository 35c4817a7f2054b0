"""The watch daemon's promise: the alert email for a drifting step arrives within 5 seconds
of that step landing in the database (real SMTP server on loopback, default 2 s interval,
on SQLite and PostgreSQL). The step is written just after a pass, the worst case."""

from __future__ import annotations

import threading
import time

from support.alerts import INSTANT_BUDGET_RULE, smtp_server

from monitor.alerts import AlertEngine, AlertSettings, parse_rules
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps


def test_alert_email_arrives_within_5_seconds_of_the_step(db) -> None:
    now = time.time()
    run = get_or_create_run(db, "proj", "live-run", now=now)
    write_steps(
        db, run.id, [{"step": s, "wall_time": now - 100 + s, "kl_mean": 0.2} for s in range(50)]
    )
    with smtp_server() as smtp:
        engine = AlertEngine(
            db,
            parse_rules(INSTANT_BUDGET_RULE),
            settings=AlertSettings.from_env(smtp.settings_env()),
        )
        passes: list[float] = []
        passed = threading.Event()

        def on_pass(_report: object) -> None:
            passes.append(time.monotonic())
            passed.set()

        stop = threading.Event()
        watcher = threading.Thread(
            target=engine.watch, kwargs={"interval": 2.0, "stop": stop, "on_pass": on_pass}
        )
        watcher.start()
        try:
            assert passed.wait(10), "the first pass did not finish"
            landed = time.monotonic()
            write_steps(db, run.id, [{"step": 50, "wall_time": time.time(), "kl_mean": 3.0}])
            assert smtp.wait(1, timeout=10), "no alert email within 10 s"
            latency = time.monotonic() - landed
        finally:
            stop.set()
            watcher.join(timeout=30)
    assert not watcher.is_alive()
    print(f"alert latency {latency:.2f} s")
    assert latency < 5.0
    msg = smtp.messages[0].message
    assert msg["Subject"] == "[klmon] CRITICAL: kl-over-budget on proj/live-run"
