"""`klmon serve`: the dashboard on this machine (Flask's threaded server; production serves
``monitor.dashboard.wsgi:server`` with gunicorn)."""

from __future__ import annotations

import click

from monitor.config import db_url


@click.command("serve")
@click.option(
    "--db",
    "db",
    metavar="URL",
    default=None,
    help="Database URL (default: $KLMON_DB_URL or sqlite:///klmon.db).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8050, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow a non-loopback --host without authentication (only behind something that "
    "authenticates for it).",
)
def serve_cmd(db: str | None, host: str, port: int, insecure: bool | None) -> None:
    """Serve the dashboard: runs, compare, run detail down to the tokens, alerts.

    Listens on 127.0.0.1 unless told otherwise; another address needs
    KLMON_DASHBOARD_USER and KLMON_DASHBOARD_PASSWORD (basic auth) or KLMON_DASHBOARD_TOKEN,
    or --insecure.

    \b
    Example:
      klmon serve --db sqlite:///klmon.db --port 8050
      KLMON_DASHBOARD_TOKEN=... klmon serve --host 0.0.0.0
    """
    # Imported here: Dash takes a second to load, and other commands do not need it.
    from monitor.dashboard import create_app
    from monitor.dashboard.settings import DashboardSettings, is_loopback

    settings = DashboardSettings.from_env(
        db_url=db_url(db), host=host, port=port, insecure=insecure
    )
    settings.check_exposure()
    # A new database gets the schema, so a dashboard started before the first run shows
    # an empty list instead of an error; an older schema still needs `klmon db upgrade`.
    from monitor.store import Database

    app = create_app(settings, db=Database.open(settings.db_url, create=True))
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    auth = (
        "basic auth"
        if settings.user
        else "token"
        if settings.token
        else "no authentication (loopback only)"
        if is_loopback(host)
        else "no authentication (--insecure)"
    )
    click.echo(f"klmon dashboard on {where} ({auth}); Ctrl-C stops it")
    # Never Dash debug mode here: it serves tracebacks and runs a code reloader.
    app.run(host=host, port=port, debug=False, dev_tools_ui=False, dev_tools_props_check=False)
