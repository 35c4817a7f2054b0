"""Alert email: a multipart message (plain text + HTML with the chart inline as a CID
image), sent over SMTP with STARTTLS and certificate verification, or written to a mail
file / stdout when no SMTP server is configured.

The SMTP password is used for AUTH only: it is never logged, never part of an error
message, and never sent over a connection that is not encrypted (SmtpSettings.check).
"""

from __future__ import annotations

import base64
import logging
import mailbox
import os
import smtplib
import ssl
import tempfile
import threading
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import IO

from monitor.alerts.deadline import Deadline
from monitor.alerts.notify import NotifyError
from monitor.alerts.render import header_safe
from monitor.alerts.settings import AlertSettings, SmtpSettings
from monitor.store.alerts import Notification

log = logging.getLogger("monitor.alerts.email")

FALLBACK_TO = "klmon-alerts@localhost"
_MBOX_LOCK = threading.Lock()


def build_email(notification: Notification, settings: AlertSettings) -> EmailMessage:
    """The MIME message of an outbox notification. The Message-ID is derived from the
    outbox row (its id and creation time) only, so every resend of a notification (after
    a crash between the server's accept and the outbox recording it, or after a deadline
    cut off the server's answer) carries the same Message-ID, and mail clients and
    archives de-duplicate it."""
    payload = notification.payload
    msg = EmailMessage()
    msg["Subject"] = header_safe(notification.subject)
    msg["From"] = settings.mail_from
    msg["To"] = ", ".join(settings.mail_to) or FALLBACK_TO
    msg["Date"] = formatdate(notification.created_at, usegmt=True)
    domain = settings.mail_from.rpartition("@")[2].strip("<> ") or "klmon"
    msg["Message-ID"] = f"<klmon.alert.{notification.id}.{int(notification.created_at)}@{domain}>"
    if notification.run_id is not None:
        msg["X-Klmon-Run-Id"] = str(int(notification.run_id))
    msg["X-Klmon-Events"] = ",".join(str(int(i)) for i in notification.event_ids)
    msg.set_content(payload.get("text") or notification.subject)
    if payload.get("html"):
        msg.add_alternative(payload["html"], subtype="html")
        html_part = msg.get_payload()[-1]
        for cid, b64 in (payload.get("images") or {}).items():
            html_part.add_related(
                base64.b64decode(b64),
                maintype="image",
                subtype="png",
                cid=f"<{header_safe(cid)}>",
                filename=f"{header_safe(cid).split('@')[0]}.png",
                disposition="inline",
            )
    return msg


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
        text = text.replace(base64.b64encode(secret.encode()).decode(), "***")
    return text


class _Smtp(smtplib.SMTP):
    """smtplib.SMTP whose socket is registered with a delivery deadline."""

    def __init__(self, deadline: Deadline, host: str, port: int, timeout: float) -> None:
        self._deadline = deadline
        super().__init__(host, port, timeout=timeout)

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        sock = super()._get_socket(host, port, self._deadline.timeout(timeout))
        self._deadline.watch(sock)
        return sock


class _SmtpSsl(smtplib.SMTP_SSL):
    def __init__(
        self, deadline: Deadline, host: str, port: int, timeout: float, context: ssl.SSLContext
    ) -> None:
        self._deadline = deadline
        super().__init__(host, port, timeout=timeout, context=context)

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        sock = super()._get_socket(host, port, self._deadline.timeout(timeout))
        self._deadline.watch(sock)
        return sock


def send_smtp(
    msg: EmailMessage,
    smtp: SmtpSettings,
    sender: str,
    to: list[str],
    *,
    deadline: float = 30.0,
) -> None:
    """Deliver ``msg`` to ``to`` through the configured server within ``deadline`` seconds
    in all (a server that stalls mid-conversation is cut off then); raises NotifyError.

    The message counts as delivered once the server accepted its DATA: a server that then
    stalls or drops the QUIT does not make it a failure (a retry would send it twice).
    """
    smtp.check()
    where = f"SMTP {smtp.host}:{smtp.port}"
    context = ssl.create_default_context(cafile=smtp.ca_file)
    with Deadline(deadline) as limit:
        try:
            client: smtplib.SMTP
            if smtp.ssl:
                client = _SmtpSsl(limit, smtp.host, smtp.port, smtp.timeout, context)
            else:
                client = _Smtp(limit, smtp.host, smtp.port, smtp.timeout)
            try:
                client.ehlo()
                if smtp.starttls:
                    if not client.has_extn("starttls"):
                        raise NotifyError(
                            f"{where} does not offer STARTTLS; refusing to send "
                            "(KLMON_SMTP_STARTTLS is on)",
                            transient=False,
                        )
                    client.starttls(context=context)
                    limit.watch(client.sock)
                    client.ehlo()
                if smtp.user and smtp.password:
                    client.login(smtp.user, smtp.password)
                refused = client.send_message(msg, from_addr=sender, to_addrs=to)
            except BaseException:
                client.close()
                raise
            _quit_quietly(client, limit)
        except NotifyError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise NotifyError(
                f"{where}: authentication as {smtp.user!r} failed ({exc.smtp_code})",
                transient=False,
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise NotifyError(
                f"{where}: the server certificate did not verify ({exc.verify_message}); "
                "set KLMON_SMTP_CA_FILE to the CA that signed it",
                transient=False,
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            if limit.expired:
                raise NotifyError(
                    f"{where}: not done within the {limit.seconds:g} s delivery deadline "
                    "(KLMON_ALERT_DELIVERY_DEADLINE)"
                ) from None
            detail = _scrub(f"{type(exc).__name__}: {exc}", smtp.password)
            raise NotifyError(f"{where}: {detail}") from None
    if refused and len(refused) == len(to):
        raise NotifyError(f"{where} refused every recipient", transient=False)
    if refused:
        log.warning("%s refused recipients %s", where, sorted(refused))


def _quit_quietly(client: smtplib.SMTP, limit: Deadline) -> None:
    """Say QUIT, waiting at most 2 s for the answer: the message is already accepted."""
    try:
        if client.sock is not None:
            client.sock.settimeout(limit.timeout(2.0))
        client.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        client.close()


class SmtpSender:
    channel = "email"

    def __init__(self, settings: AlertSettings) -> None:
        assert settings.smtp is not None
        if not settings.mail_to:
            from monitor.errors import ConfigError

            raise ConfigError(
                "KLMON_ALERT_TO must name at least one recipient with KLMON_SMTP_HOST"
            )
        self.settings = settings
        self.smtp = settings.smtp

    def describe(self) -> str:
        return f"email via {self.smtp!r} to {', '.join(self.settings.mail_to)}"

    def send(self, notification: Notification) -> None:
        msg = build_email(notification, self.settings)
        send_smtp(
            msg,
            self.smtp,
            self.settings.mail_from,
            list(self.settings.mail_to),
            deadline=self.settings.delivery_deadline,
        )


class FileMailSender:
    """Without SMTP: append to an mbox file, or write one ``.eml`` per message into a
    directory (KLMON_MAIL_FILE ending in ``/`` or naming an existing directory)."""

    channel = "email"

    def __init__(self, settings: AlertSettings) -> None:
        assert settings.mail_file
        self.settings = settings
        self.path = settings.mail_file

    @property
    def is_dir(self) -> bool:
        return self.path.endswith(("/", os.sep)) or os.path.isdir(self.path)

    def describe(self) -> str:
        kind = "directory of .eml files" if self.is_dir else "mbox"
        return f"email to {kind} {self.path}"

    def send(self, notification: Notification) -> None:
        msg = build_email(notification, self.settings)
        try:
            if self.is_dir:
                folder = Path(self.path)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"klmon-{int(notification.created_at)}-{notification.id}.eml"
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(msg.as_bytes())
                os.replace(tmp, folder / name)
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # mbox locks are per process (fcntl): the delivery workers of this one
                # take turns here
                with _MBOX_LOCK:
                    box = mailbox.mbox(self.path)
                    box.lock()
                    try:
                        box.add(msg)
                        box.flush()
                    finally:
                        box.unlock()
                        box.close()
        except OSError as exc:
            raise NotifyError(f"mail file {self.path}: {exc}") from None


class StreamMailSender:
    """Without SMTP or a mail file: print the message (the demo's default)."""

    channel = "email"

    def __init__(self, settings: AlertSettings, stream: IO[str]) -> None:
        self.settings = settings
        self.stream = stream

    def describe(self) -> str:
        return "email printed to stdout (set KLMON_SMTP_HOST or KLMON_MAIL_FILE)"

    def send(self, notification: Notification) -> None:
        msg = build_email(notification, self.settings)
        # Print the readable part only: the HTML and the PNG are for mail clients.
        text = msg.get_body(preferencelist=("plain",))
        body = text.get_content() if text is not None else ""
        try:
            self.stream.write(
                f"----- alert email {msg['Message-ID']} -----\n"
                f"Subject: {msg['Subject']}\nTo: {msg['To']}\n\n{body}"
                "----- end of alert email -----\n"
            )
            self.stream.flush()
        except (OSError, ValueError) as exc:
            raise NotifyError(f"stdout: {exc}") from None
