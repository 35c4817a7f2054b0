"""A total time budget for one delivery, enforced on the sockets it opens.

Socket timeouts bound each read, not a delivery: a receiver that answers one byte every few
seconds, or a server that stalls after accepting the connection, keeps every read under its
timeout for as long as it likes. A ``Deadline`` shuts down the sockets registered with it
when its time is up, which wakes the blocked read at once; the sender then reports the
delivery as failed (it is retried later from the outbox).

Connecting and the TLS handshake are bounded by the per-operation timeout only, capped by
what is left of the deadline when they start (the socket is registered once it exists).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType


class Deadline:
    """``with Deadline(30.0) as d:`` ... ``d.watch(sock)`` for every socket the delivery
    opens; ``d.timeout(10.0)`` is the timeout to give an operation; ``d.expired`` says
    whether the deadline cut the delivery off."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._done = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._done = True
            self._sockets.clear()
        self._timer.cancel()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._end

    @property
    def cut(self) -> bool:
        """Whether the deadline shut the sockets down: what was read may be truncated."""
        return self._expired

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def timeout(self, per_operation: float) -> float:
        """The timeout for one operation: ``per_operation``, capped by the time left (and
        at least 10 ms, so an expired deadline fails the operation instead of blocking)."""
        return max(0.01, min(float(per_operation), self.remaining()))

    def watch(self, sock: socket.socket | None) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it has)."""
        if sock is None:
            return
        with self._lock:
            if self._done:
                return
            if not self._expired:
                self._sockets.append(sock)
                return
        _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown on the descriptor (bypassing SSLSocket's unwrap): the peer sees
    # the connection end and a read blocked in another thread returns. A socket already
    # closed has no descriptor (fileno -1), so nothing else can be hit by mistake.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
