"""Sending the outbox, apart from evaluation: a pool of worker threads per channel.

A row is claimed (a lease in the outbox: ``claimed_by`` this process until
``claimed_until``) only when a worker of its channel is free to send it at once, and every
send is bounded by the delivery deadline (KLMON_ALERT_DELIVERY_DEADLINE, enforced on the
sockets, not per read). So a receiver that trickles or hangs holds one worker for at most
the deadline and delays only its own notifications: the other channel, and the other
notifications of its channel on the other workers, go on. The lease
(KLMON_ALERT_DELIVERY_LEASE) outlasts the deadline, so a second watcher on the database
never claims a row whose delivery is still running; it takes a row over only when its
claimer died. A row is marked sent after the channel accepted it, else retried with
exponential backoff; a resend (after a crash between the accept and ``mark_sent``) carries
the same Message-ID / Idempotency-Key, derived from the outbox row.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Literal

from monitor.alerts.notify import NotifyError, Sender
from monitor.alerts.settings import AlertSettings
from monitor.errors import KlmonError
from monitor.store import alerts as alert_store
from monitor.store.database import Database

log = logging.getLogger("monitor.alerts")

#: Outbox retry schedule: 5 s, 10 s, 20 s ... capped at 5 min; give up after 60 attempts.
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0
MAX_ATTEMPTS = 60

Outcome = Literal["sent", "failed"]


def worker_name() -> str:
    """host:pid:random, what ``claimed_by`` holds (unique per process and engine)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in ".-")[:60]
    return f"{host or 'localhost'}:{os.getpid()}:{secrets.token_hex(4)}"


class Delivery:
    """Claims due outbox rows and sends them on per-channel worker pools."""

    def __init__(
        self,
        db: Database,
        senders: Mapping[str, Sender],
        settings: AlertSettings,
        clock: Callable[[], float],
    ) -> None:
        self.db = db
        self.senders = senders
        self.settings = settings
        self.clock = clock
        self.name = worker_name()
        self.workers = settings.delivery_workers
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()
        self._pools: dict[str, ThreadPoolExecutor] = {}

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, *, per_channel: int | None = None) -> list[Future[Outcome]]:
        """Claim as many due rows per channel as it has free workers (at most
        ``per_channel``) and start sending them; returns their futures."""
        now = self.clock()
        futures: list[Future[Outcome]] = []
        for channel in list(self.senders):
            with self._lock:
                free = self.workers - self._busy[channel]
            if per_channel is not None:
                free = min(free, per_channel)
            if free <= 0:
                continue
            for n in alert_store.claim_notifications(
                self.db,
                now,
                lease_s=self.settings.lease_s,
                limit=free,
                claimed_by=self.name,
                channel=channel,
            ):
                futures.append(self._start(n))
        # rows enqueued for a channel this process has no sender for (settings changed)
        for n in alert_store.claim_notifications(
            self.db,
            now,
            lease_s=self.settings.lease_s,
            limit=per_channel or self.workers,
            claimed_by=self.name,
            not_channels=tuple(self.senders),
        ):
            done: Future[Outcome] = Future()
            missing = NotifyError(f"channel {n.channel!r} is not configured", transient=False)
            self._failed(n, missing)
            done.set_result("failed")
            futures.append(done)
        return futures

    def _start(self, n: alert_store.Notification) -> Future[Outcome]:
        with self._lock:
            self._busy[n.channel] += 1
            pool = self._pools.get(n.channel)
            if pool is None:
                pool = ThreadPoolExecutor(
                    max_workers=self.workers, thread_name_prefix=f"klmon-deliver-{n.channel}"
                )
                self._pools[n.channel] = pool
        future = pool.submit(self._send, n)
        future.add_done_callback(lambda _f, channel=n.channel: self._finished(channel))
        return future

    def _finished(self, channel: str) -> None:
        with self._lock:
            self._busy[channel] -= 1
        self.wake.set()  # a worker is free: claim the next due row now

    # ------------------------------------------------------------------ one send

    def _send(self, n: alert_store.Notification) -> Outcome:
        try:
            self.senders[n.channel].send(n)
        except NotifyError as exc:
            self._failed(n, exc)
            return "failed"
        except Exception as exc:  # a sender bug must not leave the row claimed
            log.exception("notification %s (%s): the sender crashed", n.id, n.channel)
            self._failed(n, NotifyError(f"{type(exc).__name__}: {exc}"))
            return "failed"
        try:
            if not alert_store.mark_sent(self.db, n.id, self.clock(), claimed_by=self.name):
                log.warning(
                    "notification %s (%s) sent after its lease was taken over", n.id, n.channel
                )
        except KlmonError as exc:  # resent after the lease, with the same Message-ID
            log.error("notification %s sent but not recorded: %s", n.id, exc)
        log.info("notification %s sent by %s: %s", n.id, n.channel, n.subject)
        return "sent"

    def _failed(self, n: alert_store.Notification, exc: NotifyError) -> None:
        attempts = n.attempts + 1
        dead = attempts >= MAX_ATTEMPTS
        delay = min(RETRY_BASE_S * 2 ** (attempts - 1), RETRY_MAX_S)
        log.error(
            "notification %s (%s) failed, attempt %s: %s; %s",
            n.id,
            n.channel,
            attempts,
            exc,
            "giving up" if dead else f"retrying in {delay:.0f} s",
        )
        try:
            alert_store.mark_failed(
                self.db,
                n.id,
                error=str(exc),
                next_attempt_at=self.clock() + delay,
                dead=dead,
                claimed_by=self.name,
            )
        except KlmonError as err:  # retried once the lease expires
            log.error("notification %s: could not record the failure: %s", n.id, err)

    # ------------------------------------------------------------------ modes

    def deliver_due(self, limit: int = 50) -> Counter[Outcome]:
        """Send what is due now and wait for it (``klmon alerts check``): waves of at most
        one row per free worker, so no claimed row waits in a queue past its lease."""
        outcomes: Counter[Outcome] = Counter()
        try:
            while outcomes.total() < limit:
                futures = self.dispatch(per_channel=min(self.workers, limit - outcomes.total()))
                if not futures:
                    break
                wait(futures)
                outcomes.update(f.result() for f in futures)
        finally:
            self.close()  # no idle threads left behind between passes
        return outcomes

    def run(self, stop: threading.Event, interval: float) -> None:
        """The watcher's dispatcher: claim and start due rows whenever a notification is
        enqueued, a worker frees up, or ``interval`` passes, until ``stop``; then wait
        for the sends under way (each ends within the deadline)."""
        while not stop.is_set():
            self.wake.wait(timeout=interval)
            self.wake.clear()
            if stop.is_set():
                break
            try:
                self.dispatch()
            except KlmonError as exc:
                log.error("alert delivery failed: %s", exc)
            except Exception:  # keep delivering whatever one bad row did
                log.exception("alert delivery crashed")
        self.close()

    def close(self) -> None:
        """Wait for the sends under way (bounded by the deadline) and stop the pools."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.shutdown(wait=True)
