"""Webhook: one JSON POST per notification, Slack-compatible (a ``text`` field) with the
structured episodes alongside. Only the http(s) URL from KLMON_WEBHOOK_URL is ever
contacted: redirects are not followed, and the URL (which often embeds a token) is shown
with its path hidden.

A send tries ``attempts`` times with exponential backoff (0.5 s, 1 s, ...) on connection
errors, 429 and 5xx; after that the outbox retries on a later pass.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from monitor import __version__
from monitor.alerts.notify import NotifyError
from monitor.alerts.settings import AlertSettings, check_webhook_url, redact_webhook_url
from monitor.store.alerts import Notification

log = logging.getLogger("monitor.alerts.webhook")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None  # a redirect is an error: never POST somewhere not configured


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
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep or time.sleep
        self._opener = urllib.request.build_opener(_NoRedirect())

    def describe(self) -> str:
        return f"webhook {redact_webhook_url(self.url)}"

    def send(self, notification: Notification) -> None:
        body = dict(notification.payload)
        body.setdefault("text", notification.subject)
        body["notification_id"] = notification.id
        body["event_ids"] = list(notification.event_ids)
        data = json.dumps(body, default=str).encode("utf-8")
        where = redact_webhook_url(self.url)
        last = ""
        for attempt in range(1, self.attempts + 1):
            req = urllib.request.Request(
                self.url,
                data=data,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": f"klmon/{__version__}",
                    "Idempotency-Key": f"klmon-notification-{notification.id}",
                },
            )
            delay = self.backoff * 2 ** (attempt - 1)
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    resp.read(1024)
                    return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUSES:
                    raise NotifyError(f"webhook {where}: {last}", transient=False) from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().isdigit():
                    delay = min(float(retry_after), MAX_RETRY_AFTER)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.attempts:
                log.info("webhook %s: %s; retrying in %.1f s", where, last, delay)
                self.sleep(delay)
        raise NotifyError(f"webhook {where}: {last} (after {self.attempts} attempts)")
