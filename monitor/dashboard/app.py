"""The app factory: ``create_app(settings)`` builds a Dash app bound to one database.

Nothing lives in module globals: each call makes its own Flask server, data layer and
callbacks, so tests build a fresh app per database and gunicorn workers
(``monitor.dashboard.wsgi:server``) each hold their own. Debug mode is never on; callback
errors reach the browser as a sentence (see ``data.user_message``), never a traceback.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from dash import Dash, Input, Output, dcc, html
from flask import Flask, Response

from monitor.dashboard import auth, ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.dashboard.pages import alerts, common, compare, run, runs
from monitor.dashboard.settings import DashboardSettings
from monitor.errors import KlmonError, NotFound
from monitor.store import Database

log = logging.getLogger("monitor.dashboard")
RUN_PATH = re.compile(r"/run/(\d{1,12})/?")
NAV_LINKS = (("Runs", "/"), ("Compare", "/compare"), ("Alerts", "/alerts"))


def _shell() -> html.Div:
    return html.Div(
        [
            dcc.Location(id=ids.URL, refresh="callback-nav"),
            html.Nav(
                [html.Span("klmon", className="brand")]
                + [dcc.Link(label, href=href, className="nav-link") for label, href in NAV_LINKS],
                id=ids.NAV,
                className="nav",
            ),
            # Only page changes show the spinner, never a chart's live update or zoom.
            dcc.Loading(
                html.Div(id=ids.PAGE, className="container"),
                delay_show=400,
                type="dot",
                target_components={ids.PAGE: "children"},
            ),
        ]
    )


def render_page(
    data: DashboardData, settings: DashboardSettings, pathname: str | None, search: str | None
) -> Any:
    """The page for a URL (the router callback's body, callable without a browser)."""
    path = (pathname or "/").rstrip("/") or "/"
    try:
        if path == "/":
            return runs.layout(data, settings)
        if path == "/compare":
            return compare.layout(data, settings, search)
        if path == "/alerts":
            return alerts.layout(data, settings)
        m = RUN_PATH.fullmatch(path)
        if m:
            return run.layout(data, settings, int(m.group(1)), search)
        return common.page(
            "Not found",
            common.error_box(f"There is no page at {path[:200]}"),
            dcc.Link("Runs", href="/"),
        )
    except NotFound as exc:
        return common.page("Not found", common.error_box(str(exc)), dcc.Link("Runs", href="/"))
    except Exception as exc:
        return common.page("Error", common.error_box(user_message(exc)))


def create_app(settings: DashboardSettings, *, db: Database | None = None) -> Dash:
    """A dashboard app on ``settings.db_url`` (or an already open ``db``).

    Raises klmon errors (an unreachable database, an out-of-date schema) at once rather than
    on the first page view.
    """
    database = db if db is not None else Database.open(settings.db_url)
    data = DashboardData(
        database,
        stall_factor=settings.stall_factor,
        stall_min_seconds=settings.stall_min_seconds,
    )
    server = Flask("monitor.dashboard")
    server.config["MAX_CONTENT_LENGTH"] = 2 * 1024 * 1024  # callback requests are small
    auth.install(server, settings)

    @server.route("/healthz")
    def healthz() -> Response:
        try:
            database.ping()
        except KlmonError:
            return Response("database unavailable\n", status=503, mimetype="text/plain")
        return Response("ok\n", mimetype="text/plain")

    app = Dash(
        "monitor.dashboard",
        server=server,
        title="klmon",
        update_title=None,
        suppress_callback_exceptions=True,
        serve_locally=True,
        assets_folder=str(Path(__file__).parent / "assets"),
        compress=False,
    )
    app.layout = _shell()

    @app.callback(
        Output(ids.PAGE, "children"),
        Input(ids.URL, "pathname"),
        Input(ids.URL, "search"),
    )
    def route(pathname: str | None, search: str | None) -> Any:
        return render_page(data, settings, pathname, search)

    for page_module in (runs, compare, run, alerts):
        page_module.register(app, data, settings)
    app.klmon_data = data  # type: ignore[attr-defined]  # for tests and the benchmark
    app.klmon_settings = settings  # type: ignore[attr-defined]
    return app
