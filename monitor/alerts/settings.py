"""Alerting settings, read from the environment (every KLMON_* variable alerting reads is here).

| variable | default | meaning |
|---|---|---|
| KLMON_ALERT_RULES | the packaged default pack | rules file (TOML) |
| KLMON_ALERT_TO | (none) | comma-separated recipients of alert emails |
| KLMON_SMTP_HOST | (none: mail goes to KLMON_MAIL_FILE or stdout) | SMTP server |
| KLMON_SMTP_PORT | 587 (465 with KLMON_SMTP_SSL) | SMTP port |
| KLMON_SMTP_USER / KLMON_SMTP_PASSWORD | (none) | SMTP AUTH credentials; never sent in clear |
| KLMON_SMTP_FROM | klmon@<hostname> | sender address |
| KLMON_SMTP_STARTTLS | on | upgrade the connection with STARTTLS (certificate verified) |
| KLMON_SMTP_SSL | off | implicit TLS (SMTPS, port 465) instead of STARTTLS |
| KLMON_SMTP_CA_FILE | system trust store | CA bundle to verify the SMTP server with |
| KLMON_SMTP_TIMEOUT | 10 | seconds per SMTP operation |
| KLMON_MAIL_FILE | (none: stdout) | without SMTP: mbox file, or a directory for .eml files |
| KLMON_DASHBOARD_URL | (none) | base URL of the dashboard, for links in notifications |
| KLMON_WEBHOOK_URL | (none) | http(s) URL that receives a JSON POST per notification |
| KLMON_WEBHOOK_TIMEOUT | 5 | seconds per webhook read |
| KLMON_ALERT_NODATA_AFTER | 300 | seconds without a step before a running run is "no data" |
| KLMON_ALERT_DELIVERY_DEADLINE | 30 | seconds one delivery may take in all (then retried) |
| KLMON_ALERT_DELIVERY_LEASE | deadline + 60 | seconds a watcher holds the row it sends |
| KLMON_ALERT_DELIVERY_WORKERS | 4 | notifications sent at once per channel |
| KLMON_ALERT_MAX_PER_RULE | 3 | firing notifications per (run, rule) per window; 0: no cap |
| KLMON_ALERT_MAX_WINDOW | 3600 | seconds of that window |
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from monitor.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected on/off (1/0, true/false, yes/no)")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{name}={raw!r}: must be positive")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def no_header_breaks(name: str, value: str) -> str:
    """Refuse CR/LF (and other control characters) in a value that becomes a mail header."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{name} contains a line break or control character")
    return value


def _addresses(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name) or ""
    no_header_breaks(name, raw)
    out = tuple(a.strip() for a in raw.split(",") if a.strip())
    for a in out:
        if "@" not in a or " " in a:
            raise ConfigError(f"{name}: {a!r} is not an email address")
    return out


def check_webhook_url(url: str, name: str = "KLMON_WEBHOOK_URL") -> str:
    """Only http(s) URLs with a host: never file:, ftp: or a bare path."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host")
    if any(ord(c) < 33 for c in url):
        raise ConfigError(f"{name} contains whitespace or control characters")
    return url


def redact_webhook_url(url: str) -> str:
    """scheme://host[:port]/… : webhook paths often embed a secret token (Slack, Teams)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, "/…" if parts.path not in ("", "/") else "", "", ""))


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the SMTP server. ``repr`` never shows the password."""

    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True
    ssl: bool = False
    ca_file: str | None = None
    timeout: float = 10.0

    def __repr__(self) -> str:
        auth = f"{self.user}:***@" if self.user else ""
        mode = "ssl" if self.ssl else ("starttls" if self.starttls else "plain")
        return f"SmtpSettings(smtp://{auth}{self.host}:{self.port}, {mode})"

    def check(self) -> None:
        """Refuse to send credentials over a connection that is not encrypted."""
        if (self.user or self.password) and not (self.starttls or self.ssl):
            raise ConfigError(
                "refusing to send SMTP credentials over plaintext: set KLMON_SMTP_STARTTLS=on "
                "(default) or KLMON_SMTP_SSL=on, or unset KLMON_SMTP_USER/KLMON_SMTP_PASSWORD"
            )
        if bool(self.user) != bool(self.password):
            raise ConfigError("KLMON_SMTP_USER and KLMON_SMTP_PASSWORD must be set together")


@dataclass(frozen=True)
class AlertSettings:
    """Everything the alert engine and its notifiers read from the environment."""

    rules_path: str | None = None
    mail_from: str = "klmon@localhost"
    mail_to: tuple[str, ...] = ()
    smtp: SmtpSettings | None = None
    mail_file: str | None = None
    dashboard_url: str | None = None
    webhook_url: str | None = field(default=None, repr=False)
    webhook_timeout: float = 5.0
    nodata_after: float = 300.0
    delivery_deadline: float = 30.0
    delivery_lease: float | None = None
    delivery_workers: int = 4
    max_per_rule: int = 3
    max_window: float = 3600.0

    def __post_init__(self) -> None:
        if self.delivery_lease is None:
            object.__setattr__(self, "delivery_lease", self.delivery_deadline + 60.0)
        elif not self.delivery_lease > self.delivery_deadline:
            raise ConfigError(
                f"KLMON_ALERT_DELIVERY_LEASE={self.delivery_lease:g} must be longer than "
                f"KLMON_ALERT_DELIVERY_DEADLINE={self.delivery_deadline:g}: a claim that "
                "expires while its delivery runs lets another watcher send it again"
            )

    @property
    def lease_s(self) -> float:
        """Seconds a watcher holds an outbox row it is sending."""
        assert self.delivery_lease is not None
        return self.delivery_lease

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AlertSettings:
        env = os.environ if env is None else env
        smtp = None
        host = (env.get("KLMON_SMTP_HOST") or "").strip()
        if host:
            no_header_breaks("KLMON_SMTP_HOST", host)
            use_ssl = _bool(env, "KLMON_SMTP_SSL", False)
            port_raw = env.get("KLMON_SMTP_PORT") or ("465" if use_ssl else "587")
            try:
                port = int(port_raw)
            except ValueError:
                raise ConfigError(f"KLMON_SMTP_PORT={port_raw!r}: expected a port number") from None
            ca_file = env.get("KLMON_SMTP_CA_FILE") or None
            if ca_file and not os.path.isfile(ca_file):
                raise ConfigError(f"KLMON_SMTP_CA_FILE={ca_file!r} is not a file")
            smtp = SmtpSettings(
                host=host,
                port=port,
                user=env.get("KLMON_SMTP_USER") or None,
                password=env.get("KLMON_SMTP_PASSWORD") or None,
                starttls=_bool(env, "KLMON_SMTP_STARTTLS", True) and not use_ssl,
                ssl=use_ssl,
                ca_file=ca_file,
                timeout=_float(env, "KLMON_SMTP_TIMEOUT", 10.0),
            )
            smtp.check()
        mail_from = env.get("KLMON_SMTP_FROM") or f"klmon@{_hostname()}"
        no_header_breaks("KLMON_SMTP_FROM", mail_from)
        webhook = (env.get("KLMON_WEBHOOK_URL") or "").strip() or None
        if webhook:
            check_webhook_url(webhook)
        dashboard = (env.get("KLMON_DASHBOARD_URL") or "").strip().rstrip("/") or None
        if dashboard:
            check_webhook_url(dashboard, "KLMON_DASHBOARD_URL")
        return cls(
            rules_path=env.get("KLMON_ALERT_RULES") or None,
            mail_from=mail_from,
            mail_to=_addresses(env, "KLMON_ALERT_TO"),
            smtp=smtp,
            mail_file=env.get("KLMON_MAIL_FILE") or None,
            dashboard_url=dashboard,
            webhook_url=webhook,
            webhook_timeout=_float(env, "KLMON_WEBHOOK_TIMEOUT", 5.0),
            nodata_after=_float(env, "KLMON_ALERT_NODATA_AFTER", 300.0),
            delivery_deadline=_float(env, "KLMON_ALERT_DELIVERY_DEADLINE", 30.0),
            delivery_lease=(
                _float(env, "KLMON_ALERT_DELIVERY_LEASE", 0.0)
                if (env.get("KLMON_ALERT_DELIVERY_LEASE") or "").strip()
                else None
            ),
            delivery_workers=_int(env, "KLMON_ALERT_DELIVERY_WORKERS", 4, minimum=1),
            max_per_rule=_int(env, "KLMON_ALERT_MAX_PER_RULE", 3, minimum=0),
            max_window=_float(env, "KLMON_ALERT_MAX_WINDOW", 3600.0),
        )

    def describe(self) -> str:
        """One line for logs, without secrets."""
        if self.smtp:
            mail = repr(self.smtp)
        elif self.mail_file:
            mail = f"file {self.mail_file}"
        else:
            mail = "stdout"
        hook = redact_webhook_url(self.webhook_url) if self.webhook_url else "none"
        to = ", ".join(self.mail_to) or "(no KLMON_ALERT_TO)"
        return f"email via {mail} to {to}; webhook {hook}"


def _hostname() -> str:
    name = socket.gethostname() or "localhost"
    return "".join(c for c in name if c.isalnum() or c in ".-") or "localhost"
