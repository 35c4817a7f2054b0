"""WSGI entry point: ``gunicorn --workers 3 --bind 0.0.0.0:8050 monitor.dashboard.wsgi:server``.

Settings come from the environment (``DashboardSettings.from_env``). A server started this
way may listen beyond this machine, so it refuses to start without authentication unless
``KLMON_DASHBOARD_INSECURE=1`` (behind an authenticating proxy, say).
"""

from __future__ import annotations

import os

from monitor.dashboard.app import create_app
from monitor.dashboard.settings import DashboardSettings

_settings = DashboardSettings.from_env(host=os.environ.get("KLMON_DASHBOARD_HOST", "0.0.0.0"))
_settings.check_exposure()
app = create_app(_settings)
server = app.server
