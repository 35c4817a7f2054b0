"""Alert latency: seconds from a drifting step landing in the database to its alert email
arriving at a real SMTP server (aiosmtpd on loopback), through `klmon alerts watch`'s engine.

Each trial writes a new run's first step with KL above the rule's budget at a random phase
of the watch interval, then waits for the message. The baseline, measured in the same run,
is rendering + sending one alert email directly (no database, no polling): what the watch
loop adds on top of it is the polling wait (up to one interval) and the evaluation.
Target: every trial under 5 s at the default 2 s interval.

    python benchmarks/bench_alert_latency.py [--trials 8] [--intervals 2,0.5] [--pg URL]

Needs the test extras (aiosmtpd).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from aiosmtpd.controller import Controller

from monitor.alerts import AlertEngine, AlertSettings, parse_rules
from monitor.alerts.notify_email import build_email, send_smtp
from monitor.alerts.render import RunLabel, render
from monitor.store.alerts import AlertEvent, Notification
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.alerts import INSTANT_BUDGET_RULE, free_port
from support.db import migrate, migrated_sqlite

TARGET_S = 5.0


class Inbox:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.event = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        self.arrivals.append((time.monotonic(), bytes(envelope.content)))
        self.event.set()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 15.0) -> float | None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count and time.monotonic() < deadline:
            self.event.wait(0.01)
            self.event.clear()
        return self.arrivals[count - 1][0] if len(self.arrivals) >= count else None


def baseline(settings: AlertSettings, inbox: Inbox, trials: int) -> list[float]:
    """Render + send one alert email directly, no database or polling."""
    import pandas as pd

    out = []
    steps = pd.DataFrame({"step": range(200), "kl_mean": [0.2] * 199 + [3.0]})
    for i in range(trials):
        ev = AlertEvent(i, 1, "kl-over-budget", "budget", "critical", "firing", 199, 199, None,
                        199, 3.0, 1.0, 3.0, "KL 3 above 1", ("cause",), 0.0, 0.0, None, None,
                        None, False, False)  # fmt: skip
        before = len(inbox.arrivals)
        t0 = time.monotonic()
        r = render(RunLabel(1, "bench", "baseline"), [ev], [], steps=steps)
        n = Notification(i, 1, "email", r.subject, r.email_payload(), (i,), "pending", 0,
                         time.time(), time.time(), None, None)  # fmt: skip
        assert settings.smtp is not None
        send_smtp(build_email(n, settings), settings.smtp, settings.mail_from, ["b@example.com"])
        arrived = inbox.wait_for(before + 1)
        out.append((arrived or float("nan")) - t0)
    return out


def trials_on(
    url: str, settings: AlertSettings, inbox: Inbox, interval: float, n: int
) -> list[float]:
    db = Database.open(url)
    engine = AlertEngine(db, parse_rules(INSTANT_BUDGET_RULE), settings=settings)
    stop = threading.Event()
    watcher = threading.Thread(target=engine.watch, kwargs={"interval": interval, "stop": stop})
    watcher.start()
    latencies = []
    try:
        time.sleep(interval)  # let the first pass run
        for i in range(n):
            time.sleep(random.uniform(0, interval))  # a random phase of the interval
            run = get_or_create_run(db, "bench", f"drift-{interval}-{i}-{time.time_ns()}")
            before = len(inbox.arrivals)
            t0 = time.monotonic()
            write_steps(db, run.id, [{"step": 0, "wall_time": time.time(), "kl_mean": 3.0}])
            arrived = inbox.wait_for(before + 1)
            latencies.append((arrived or float("nan")) - t0)
    finally:
        stop.set()
        watcher.join(timeout=30)
        db.dispose()
    return latencies


def pg_database(admin_url: str, name: str, *, drop: bool = False) -> str:
    """Create (or drop) a scratch database next to ``admin_url``; returns its URL."""
    from sqlalchemy import text

    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if drop:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    return url if drop else migrate(url)


def row(label: str, xs: list[float]) -> str:
    return (
        f"{label:<28} {len(xs):>6} {min(xs):>8.2f} {statistics.median(xs):>8.2f} "
        f"{max(xs):>8.2f}  {'ok' if max(xs) < TARGET_S else 'OVER'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--intervals", default="2,0.5", help="watch intervals in seconds")
    parser.add_argument("--pg", default=None, help="PostgreSQL admin URL (creates a database)")
    args = parser.parse_args()
    random.seed(0)
    logging.getLogger("monitor.alerts").setLevel(logging.ERROR)
    pg_name = f"klmon_bench_{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    env = {
        "KLMON_SMTP_HOST": "127.0.0.1",
        "KLMON_SMTP_PORT": str(port),
        "KLMON_SMTP_STARTTLS": "off",
        "KLMON_SMTP_FROM": "klmon@example.com",
        "KLMON_ALERT_TO": "oncall@example.com",
    }
    settings = AlertSettings.from_env(env)
    print(f"{'seconds, step landed -> email':<28} {'trials':>6} {'min':>8} {'median':>8} "
          f"{'max':>8}  target < {TARGET_S:g} s")  # fmt: skip
    try:
        print(row("baseline: render + send", baseline(settings, inbox, args.trials)))
        with tempfile.TemporaryDirectory() as tmp:
            dbs = [("sqlite", migrated_sqlite(Path(tmp) / "bench.db"))]
            if args.pg:
                dbs.append(("postgresql", pg_database(args.pg, pg_name)))
            for label, url in dbs:
                for interval in (float(x) for x in args.intervals.split(",")):
                    xs = trials_on(url, settings, inbox, interval, args.trials)
                    print(row(f"watch {interval:g} s, {label}", xs))
    finally:
        controller.stop()
        if args.pg:
            pg_database(args.pg, pg_name, drop=True)


if __name__ == "__main__":
    main()
