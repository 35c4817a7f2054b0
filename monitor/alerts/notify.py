"""Notification channels: what the outbox hands a notification to.

A sender's ``send(notification)`` returns when the channel accepted it and raises
NotifyError otherwise; the outbox then retries later. Senders are called from the delivery
workers (monitor.alerts.delivery), several at once, and a network sender ends every call
within ``settings.delivery_deadline`` seconds (monitor.alerts.deadline).

``senders_for`` builds the senders the settings describe: email always (SMTP, else a mail
file, else stdout), webhook when KLMON_WEBHOOK_URL is set.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Protocol

from monitor.alerts.settings import AlertSettings
from monitor.errors import KlmonError
from monitor.store.alerts import Notification


class NotifyError(KlmonError):
    """A channel did not accept a notification (it is retried later).

    ``transient``: the channel itself is unreachable (connection refused, timeout), so the
    other notifications of this pass for the same channel are deferred rather than tried.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class Sender(Protocol):
    channel: str

    def send(self, notification: Notification) -> None: ...

    def describe(self) -> str: ...


def channels_for(settings: AlertSettings) -> tuple[str, ...]:
    """The channels a notification is enqueued on."""
    return ("email", "webhook") if settings.webhook_url else ("email",)


def senders_for(
    settings: AlertSettings,
    *,
    stdout: IO[str] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Sender]:
    from monitor.alerts.notify_email import FileMailSender, SmtpSender, StreamMailSender
    from monitor.alerts.notify_webhook import WebhookSender

    senders: dict[str, Sender] = {}
    if settings.smtp is not None:
        senders["email"] = SmtpSender(settings)
    elif settings.mail_file and settings.mail_file != "-":
        senders["email"] = FileMailSender(settings)
    else:
        senders["email"] = StreamMailSender(settings, stdout or sys.stdout)
    if settings.webhook_url:
        senders["webhook"] = WebhookSender(settings, sleep=sleep)
    return senders
