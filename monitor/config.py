"""Settings read from the environment. Every setting klmon reads is named here.

Alerting (KLMON_ALERT_*, KLMON_SMTP_*, KLMON_MAIL_FILE, KLMON_WEBHOOK_*, KLMON_DASHBOARD_URL)
is read by ``monitor.alerts.settings.AlertSettings.from_env``, whose docstring lists them.
"""

from __future__ import annotations

import os

DEFAULT_DB_URL = "sqlite:///klmon.db"


def db_url(override: str | None = None) -> str:
    """The database URL: an explicit override (``--db``), else ``KLMON_DB_URL``, else
    ``sqlite:///klmon.db`` in the working directory."""
    return override or os.environ.get("KLMON_DB_URL") or DEFAULT_DB_URL
