"""Delivery faults against real receivers on loopback: an SMTP server (aiosmtpd) that stalls
one session, a webhook that trickles its answer or never answers, two watchers on one
database, and a watcher killed with SIGKILL after the SMTP server accepted a message.

What must hold: a slow receiver delays only its own notification (another incident's
email and webhook arrive while it is still stuck), each delivery ends within its deadline
and is retried later, two watchers send each notification once, and a notification sent
again after a crash carries the same Message-ID."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default as email_policy
from pathlib import Path
from typing import Any

import pytest
from support.alerts import (
    INSTANT_BUDGET_RULE,
    TEST_DETECTORS,
    Clock,
    add_steps,
    free_port,
    new_run,
    rules,
)

from monitor.alerts import AlertEngine, AlertSettings
from monitor.alerts.notify import senders_for
from monitor.store import alerts as store
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps

pytestmark = pytest.mark.slow

WAIT_S = 20.0  # generous bound for an event the test is waiting for (never a measurement)


# ----------------------------------------------------------------------------- receivers


@dataclass
class Inbox:
    """aiosmtpd on loopback that stalls the DATA of messages whose subject holds
    ``stall_marker`` until ``release`` is set (other sessions go on), and optionally stalls
    the first QUIT until ``release``."""

    port: int
    stall_marker: str | None = None
    stall_quit: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    messages: list[Any] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    quitting: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "KLMON_SMTP_HOST": "127.0.0.1",
            "KLMON_SMTP_PORT": str(self.port),
            "KLMON_SMTP_STARTTLS": "off",
            "KLMON_SMTP_FROM": "klmon@example.com",
            "KLMON_ALERT_TO": "oncall@example.com",
            **extra,
        }

    def subjects(self) -> list[str]:
        with self.lock:
            return [m["Subject"] for m in self.messages]

    def wait_for(self, predicate, timeout: float = WAIT_S) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.02)
        return False


@contextmanager
def inbox(**kw: Any) -> Iterator[Inbox]:
    from aiosmtpd.controller import Controller

    box = Inbox(free_port(), **kw)

    async def _wait_release() -> None:
        await asyncio.get_running_loop().run_in_executor(None, box.release.wait, 60)

    class Handler:
        async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
            msg = message_from_bytes(bytes(envelope.content), policy=email_policy)
            with box.lock:
                box.messages.append(msg)
            if box.stall_marker and box.stall_marker in msg["Subject"] and not box.release.is_set():
                box.stalled.set()  # it has the message; its "250" is what never comes
                await _wait_release()
            return "250 Message accepted"

        async def handle_QUIT(self, _server: Any, _session: Any, _envelope: Any) -> str:
            if box.stall_quit and not box.quitting.is_set():
                box.quitting.set()
                await _wait_release()
            return "221 Bye"

    controller = Controller(Handler(), hostname="127.0.0.1", port=box.port, ready_timeout=10)
    controller.start()
    try:
        yield box
    finally:
        box.release.set()
        controller.stop()


@dataclass
class Hook:
    url: str = ""
    mode: str = "ok"  # ok | slow | trickle | hang, for bodies whose text holds `marker`
    marker: str = ""
    slow_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)  # answered with 200
    keys: list[str] = field(default_factory=list)  # Idempotency-Key of every request
    stuck: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def hook(mode: str = "ok", marker: str = "", slow_s: float = 0.0) -> Iterator[Hook]:
    """A webhook receiver on loopback (raw sockets, one thread per connection)."""
    state = Hook(mode=mode, marker=marker, slow_s=slow_s)
    server = socket.create_server(("127.0.0.1", 0))
    state.url = f"http://127.0.0.1:{server.getsockname()[1]}/hooks/token"

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(
                line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
            )
            length = int(headers.get("Content-Length", 0))
            while len(body) < length:
                body += conn.recv(65536)
            payload = json.loads(body)
            with state.lock:
                state.keys.append(headers.get("Idempotency-Key", ""))
            targeted = state.marker and state.marker in payload.get("text", "")
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            if targeted and state.mode in ("trickle", "hang"):
                state.stuck.set()
                if state.mode == "hang":
                    state.release.wait(60)
                    return
                # a status line of 120 bytes, one every 0.4 s: each read is "on time",
                # the answer (and its status) never complete within the deadline
                slow_answer = b"HTTP/1.1 200 " + b"O" * 100 + answer[len(b"HTTP/1.1 200 O") :]
                for byte in slow_answer:
                    if state.release.wait(0.4):
                        return
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        return
                return
            if state.mode == "slow" and state.slow_s:
                time.sleep(state.slow_s)
            with state.lock:
                state.received.append(payload)
            conn.sendall(answer)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield state
    finally:
        state.release.set()
        server.close()


def engine_for(db: Database, env: dict[str, str], clock: Any = time.time) -> AlertEngine:
    settings = AlertSettings.from_env(env)
    return AlertEngine(
        db,
        rules(),
        settings=settings,
        clock=clock,
        senders=senders_for(settings),
        detectors=TEST_DETECTORS,
    )


@contextmanager
def watching(*engines: AlertEngine, interval: float = 0.1) -> Iterator[None]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=e.watch, kwargs={"interval": interval, "stop": stop})
        for e in engines
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


# ----------------------------------------------------------------------------- SMTP


def test_a_stalled_smtp_session_delays_only_its_own_email(db) -> None:
    """The server takes run `slow`'s email and stalls its answer; run `fast`'s email
    arrives while it is stuck, the stuck one is cut off at the deadline and sent on a
    later try, with the same Message-ID as the copy the server took."""
    with inbox(stall_marker="proj/slow") as box:
        clock = Clock()
        eng = engine_for(db, box.env(KLMON_ALERT_DELIVERY_DEADLINE="6"), clock)
        slow, fast = new_run(db, "slow"), new_run(db, "fast")
        add_steps(db, slow, 0, [2.0] * 3)
        add_steps(db, fast, 0, [2.0] * 3)
        done = threading.Event()
        result: dict[str, Any] = {}

        def one_pass() -> None:
            result["report"] = eng.run_once()
            done.set()

        threading.Thread(target=one_pass, daemon=True).start()
        assert box.stalled.wait(WAIT_S)
        assert box.wait_for(lambda: any("proj/fast" in s for s in box.subjects()))
        assert not done.is_set()  # the stalled session is still under way
        assert done.wait(WAIT_S)  # ... and is cut off by its deadline
        report = result["report"]
        assert (report.sent, report.failed) == (1, 1)
        (pending,) = store.list_notifications(db, status="pending").itertuples()
        assert "6 s delivery deadline" in pending.last_error
        box.release.set()
        clock.advance(10)
        assert eng.run_once().sent == 1
        assert box.wait_for(lambda: len(box.messages) == 3)
    slow_copies = [m for m in box.messages if "proj/slow" in m["Subject"]]
    assert len(slow_copies) == 2
    assert slow_copies[0]["Message-ID"] == slow_copies[1]["Message-ID"]
    assert store.outbox_counts(db) == {"sent": 2}


# ----------------------------------------------------------------------------- webhook


@pytest.mark.parametrize("mode", ["trickle", "hang"])
def test_a_webhook_that_trickles_or_hangs_delays_only_its_own_notification(sqlite_db, mode) -> None:
    """Under `alerts watch`: the webhook is stuck on run `slow`'s notification (an answer
    one byte every 0.4 s, or none); both emails and run `fast`'s webhook arrive while it is
    stuck, and the stuck delivery ends at its deadline with the row waiting for a retry."""
    db = sqlite_db
    with inbox() as box, hook(mode, marker="proj/slow") as receiver:
        env = box.env(KLMON_WEBHOOK_URL=receiver.url, KLMON_ALERT_DELIVERY_DEADLINE="8")
        eng = engine_for(db, env)
        slow, fast = new_run(db, "slow"), new_run(db, "fast")
        with watching(eng):
            add_steps(db, slow, 0, [2.0] * 3)
            assert receiver.stuck.wait(WAIT_S)
            add_steps(db, fast, 0, [2.0] * 3)  # a later incident on another run
            assert box.wait_for(lambda: len(box.messages) == 2)
            assert box.wait_for(lambda: len(receiver.received) == 1)
            assert "proj/fast" in receiver.received[0]["text"]
            out = store.list_notifications(db)
            first_try = out[(out["run_id"] == slow) & (out["channel"] == "webhook")]
            assert list(first_try["attempts"]) == [0]  # `slow`'s delivery still under way
            assert box.wait_for(
                lambda: any(
                    "delivery deadline" in e
                    for e in store.list_notifications(db)["last_error"]
                    if isinstance(e, str)
                )
            )
    out = store.list_notifications(db)
    stuck = out[out["status"] == "pending"]
    assert list(stuck["channel"]) == ["webhook"] and list(stuck["run_id"]) == [slow]
    assert "8 s delivery deadline" in stuck["last_error"].iloc[0]
    assert (out["status"] == "sent").sum() == 3


# ----------------------------------------------------------------------------- two watchers


def test_two_watchers_and_a_slow_webhook_send_each_notification_once(db) -> None:
    """Two watchers on one database, a webhook taking 1.5 s per answer: every notification
    reaches the webhook and the mailbox exactly once, each sent on its first attempt."""
    with inbox() as box, hook("slow", slow_s=1.5) as receiver:
        env = box.env(
            KLMON_WEBHOOK_URL=receiver.url,
            KLMON_ALERT_DELIVERY_DEADLINE="5",
            KLMON_ALERT_DELIVERY_LEASE="6",
        )
        first, second = engine_for(db, env), engine_for(db, env)
        runs = [new_run(db, f"r{i}") for i in range(4)]
        with watching(first, second, interval=0.05):
            for run in runs:
                add_steps(db, run, 0, [2.0] * 3)
            assert box.wait_for(
                lambda: store.outbox_counts(db).get("sent", 0) == 2 * len(runs), timeout=60
            )
            time.sleep(1.0)  # a duplicate would be on its way by now
    assert len(receiver.keys) == len(runs) == len(set(receiver.keys))
    ids = [m["Message-ID"] for m in box.messages]
    assert len(ids) == len(runs) == len(set(ids))
    out = store.list_notifications(db)
    assert set(out["status"]) == {"sent"} and set(out["attempts"]) == {1}


# ----------------------------------------------------------------------------- kill -9


def _watcher(db_url: str, rules_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {**os.environ, **env, "KLMON_ALERT_RULES": str(rules_path)}
    full.pop("KLMON_WEBHOOK_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "monitor", "alerts", "watch", "--db", db_url, "--interval", "0.2s"],
        env=full,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_a_watcher_killed_after_the_smtp_accept_resends_with_the_same_message_id(
    db_url, tmp_path
) -> None:
    """The server accepts the message and then holds the QUIT; the watcher is killed
    with SIGKILL before it records the send. The next watcher sends it again once the
    lease has expired, with the same Message-ID, and records it once."""
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(INSTANT_BUDGET_RULE)
    db = Database.open(db_url)
    now = time.time()
    run = get_or_create_run(db, "proj", "killed", now=now).id
    write_steps(db, run, [{"step": s, "wall_time": now, "kl_mean": 3.0} for s in range(3)])
    log = tmp_path / "watch.log"
    with inbox(stall_quit=True) as box:
        # the QUIT waits min(2 s, what is left of the deadline): time enough for the kill
        env = box.env(KLMON_ALERT_DELIVERY_DEADLINE="5", KLMON_ALERT_DELIVERY_LEASE="6")
        first = _watcher(db_url, rules_path, env, log)
        try:
            assert box.quitting.wait(60), log.read_text()
            assert len(box.messages) == 1  # accepted ...
            first.send_signal(signal.SIGKILL)  # ... and killed before recording it
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        (row,) = store.list_notifications(db).itertuples()
        assert row.status == "pending" and row.attempts == 0
        second = _watcher(db_url, rules_path, env, log)
        try:
            assert box.wait_for(lambda: len(box.messages) == 2, timeout=60), log.read_text()
            assert box.wait_for(lambda: store.outbox_counts(db) == {"sent": 1}, timeout=30)
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(30)
            except subprocess.TimeoutExpired:
                second.kill()
    db.dispose()
    a, b = box.messages
    assert a["Message-ID"] == b["Message-ID"] and a["Subject"] == b["Subject"]
    (row,) = store.list_notifications(Database.open(db_url)).itertuples()
    assert row.attempts == 1
