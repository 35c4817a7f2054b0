"""Dashboard settings: an explicit object handed to ``create_app`` (tests build their own),
read from the environment by ``DashboardSettings.from_env`` for ``klmon serve`` and gunicorn.

Environment variables:

- ``KLMON_DB_URL``: the database (see monitor.config).
- ``KLMON_DASHBOARD_USER`` and ``KLMON_DASHBOARD_PASSWORD``: HTTP basic auth.
- ``KLMON_DASHBOARD_TOKEN``: a bearer token (``Authorization: Bearer ...`` or ``?token=``
  once, which sets a cookie).
- ``KLMON_DASHBOARD_INSECURE=1``: serve without authentication on a non-loopback address
  (behind an authenticating proxy, say).
- ``KLMON_DASHBOARD_REFRESH_S``: seconds between live updates (default 5).
- ``KLMON_DASHBOARD_MAX_POINTS``: buckets per series and chart (default 600, so at most
  about 1200 points per line).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from monitor.analytics.stall import STALL_FACTOR, STALL_MIN_SECONDS
from monitor.config import db_url as _db_url
from monitor.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardSettings:
    """Everything the dashboard needs to know. Secrets are never shown in pages or logs."""

    db_url: str
    host: str = "127.0.0.1"
    port: int = 8050
    user: str | None = None
    password: str | None = None
    token: str | None = None
    insecure: bool = False
    refresh_seconds: float = 5.0
    max_buckets: int = 600
    #: Minimum seconds without a step before a running run counts as stalled; the threshold
    #: is the larger of this and ``stall_factor`` times the run's median step interval
    #: (the alert's defaults, from monitor.analytics.stall).
    stall_min_seconds: float = STALL_MIN_SECONDS
    stall_factor: float = STALL_FACTOR

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ConfigError(
                "KLMON_DASHBOARD_USER and KLMON_DASHBOARD_PASSWORD must be set together"
            )
        if self.password is not None and len(self.password) < 8:
            raise ConfigError("KLMON_DASHBOARD_PASSWORD must be at least 8 characters")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("KLMON_DASHBOARD_TOKEN must be at least 16 characters")
        if not 0.5 <= self.refresh_seconds <= 3600:
            raise ConfigError("KLMON_DASHBOARD_REFRESH_S must be between 0.5 and 3600")
        if not 50 <= self.max_buckets <= 5000:
            raise ConfigError("KLMON_DASHBOARD_MAX_POINTS must be between 50 and 5000")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not between 1 and 65535")

    @property
    def auth_configured(self) -> bool:
        return self.user is not None or self.token is not None

    def check_exposure(self) -> None:
        """Refuse to listen beyond this machine without authentication (or --insecure)."""
        if is_loopback(self.host) or self.auth_configured or self.insecure:
            return
        raise ConfigError(
            f"refusing to serve on {self.host} without authentication: set "
            "KLMON_DASHBOARD_USER and KLMON_DASHBOARD_PASSWORD (basic auth) or "
            "KLMON_DASHBOARD_TOKEN, or pass --insecure if something else guards it"
        )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: object
    ) -> DashboardSettings:
        """Settings from the environment; keyword overrides (CLI options) win when not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "db_url": _db_url(env.get("KLMON_DB_URL") or None),
            "user": env.get("KLMON_DASHBOARD_USER") or None,
            "password": env.get("KLMON_DASHBOARD_PASSWORD") or None,
            "token": env.get("KLMON_DASHBOARD_TOKEN") or None,
            "insecure": _flag(env.get("KLMON_DASHBOARD_INSECURE")),
        }
        for name, key, conv in (
            ("refresh_seconds", "KLMON_DASHBOARD_REFRESH_S", float),
            ("max_buckets", "KLMON_DASHBOARD_MAX_POINTS", int),
        ):
            raw = env.get(key)
            if raw:
                try:
                    values[name] = conv(raw)
                except ValueError:
                    raise ConfigError(f"{key}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() in {"1", "true", "yes", "on"}
