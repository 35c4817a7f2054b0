"""The klmon dashboard (Dash): runs, compare, run detail down to the tokens, alerts.

``create_app(settings)`` builds an app; ``klmon serve`` runs it; gunicorn serves
``monitor.dashboard.wsgi:server``.
"""

from __future__ import annotations

from monitor.dashboard.app import create_app
from monitor.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app"]
