"""Webhook: one JSON POST per notification, Slack-compatible (a ``text`` field) with the
structured episodes alongside. Only the http(s) URL from KLMON_WEBHOOK_URL is ever
contacted: redirects are not followed, and the URL (which often embeds a token) is shown
with its path hidden.

A send tries ``attempts`` times with exponential backoff (0.5 s, 1 s, ...) on connection
errors, 429 and 5xx, all within the delivery deadline (KLMON_ALERT_DELIVERY_DEADLINE: a
receiver that trickles its answer or never answers is cut off then); after that the outbox
retries on a later pass. Every request of a notification, first or resent, carries the
same ``Idempotency-Key: klmon-notification-<outbox id>`` so a receiver can drop repeats.
A 2xx status is acceptance: the response body is not waited for.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from monitor import __version__
from monitor.alerts.deadline import Deadline
from monitor.alerts.notify import NotifyError
from monitor.alerts.settings import AlertSettings, check_webhook_url, redact_webhook_url
from monitor.store.alerts import Notification

log = logging.getLogger("monitor.alerts.webhook")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None  # a redirect is an error: never POST somewhere not configured


class _Watched:
    """A connection whose socket the deadline watches from the moment it connects (mixed in
    before http.client's HTTP or HTTPS connection)."""

    sock: Any

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._deadline.watch(self.sock)


class _WatchedHttp(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHttps(_Watched, http.client.HTTPSConnection):
    pass


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHttp, req, deadline=self.deadline)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__(context=ssl.create_default_context())
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(
            _WatchedHttps, req, context=ssl.create_default_context(), deadline=self.deadline
        )


class WebhookSender:
    channel = "webhook"

    def __init__(
        self,
        settings: AlertSettings,
        *,
        attempts: int = 3,
        backoff: float = 0.5,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        assert settings.webhook_url
        self.url = check_webhook_url(settings.webhook_url)
        self.timeout = settings.webhook_timeout
        self.deadline = settings.delivery_deadline
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep or time.sleep

    def describe(self) -> str:
        return f"webhook {redact_webhook_url(self.url)}"

    def send(self, notification: Notification) -> None:
        body = dict(notification.payload)
        body.setdefault("text", notification.subject)
        body["notification_id"] = notification.id
        body["event_ids"] = list(notification.event_ids)
        data = json.dumps(body, default=str).encode("utf-8")
        where = redact_webhook_url(self.url)
        with Deadline(self.deadline) as limit:
            opener = urllib.request.build_opener(
                _NoRedirect(), _HttpHandler(limit), _HttpsHandler(limit)
            )
            last = ""
            for attempt in range(1, self.attempts + 1):
                delay = self.backoff * 2 ** (attempt - 1)
                try:
                    self._post(opener, data, notification.id, limit)
                    if not limit.cut:  # else the status line may be a truncated one
                        return
                    break
                except urllib.error.HTTPError as exc:
                    last = f"HTTP {exc.code} {exc.reason}"
                    if exc.code not in RETRY_STATUSES:
                        raise NotifyError(f"webhook {where}: {last}", transient=False) from None
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    if retry_after and retry_after.strip().isdigit():
                        delay = min(float(retry_after), MAX_RETRY_AFTER)
                except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                    if limit.expired:
                        break
                    reason = getattr(exc, "reason", exc)
                    last = f"{type(reason).__name__}: {reason}"
                if attempt == self.attempts:
                    break
                if delay >= limit.remaining():
                    last += " (no time left for another try)"
                    break
                log.info("webhook %s: %s; retrying in %.1f s", where, last, delay)
                self.sleep(delay)
        if limit.expired:
            raise NotifyError(
                f"webhook {where}: not done within the {self.deadline:g} s delivery deadline "
                "(KLMON_ALERT_DELIVERY_DEADLINE)"
            )
        raise NotifyError(f"webhook {where}: {last} (after {attempt} attempts)")

    def _post(
        self,
        opener: urllib.request.OpenerDirector,
        data: bytes,
        notification_id: int,
        limit: Deadline,
    ) -> None:
        req = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"klmon/{__version__}",
                "Idempotency-Key": f"klmon-notification-{notification_id}",
            },
        )
        with opener.open(req, timeout=limit.timeout(self.timeout)):
            pass  # a 2xx status is acceptance; the body is not waited for
