"""`klmon demo`: build the demo database, run the alert engine over it, serve the dashboard."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import click

from monitor.formats import json_safe
from monitor.store import redact_url


def _echo_alerts(events: Any) -> None:
    """One line per alert episode: state, severity, run, rule, steps, message."""
    for rec in events.itertuples(index=False):
        fired = json_safe(rec.fired_step)
        start = fired if fired is not None else json_safe(rec.start_step)
        end = json_safe(rec.end_step)
        steps = f"step {start}" + (f"-{end}" if end is not None else "")
        message = str(rec.message)
        if len(message) > 110:
            message = message[:107] + "..."
        click.echo(
            f"  {str(rec.state).upper():<9}{rec.severity:<9}{rec.run_name:<20}"
            f"{rec.rule:<18}{steps:<14}{message}"
        )


def _alert_settings(url: str, dashboard_url: str | None) -> tuple[Any, str]:
    """The environment's alert settings; without SMTP and mail file, mail goes to the demo's
    mbox. Returns the settings and where mail goes, in words."""
    from monitor.alerts import AlertSettings
    from monitor.demo import demo_mail_file

    settings = AlertSettings.from_env()
    if settings.smtp is not None:
        where = f"sent through {settings.smtp.host}"
    elif settings.mail_file:
        where = f"written to {settings.mail_file}"
    else:
        mbox = demo_mail_file(url)
        if os.path.exists(mbox):
            os.unlink(mbox)  # the demo's own mailbox: start it afresh with the database
        settings = dataclasses.replace(settings, mail_file=mbox)
        where = f"written to {mbox} (set KLMON_SMTP_HOST to send them)"
    if dashboard_url and not settings.dashboard_url:
        settings = dataclasses.replace(settings, dashboard_url=dashboard_url)
    return settings, where


@click.command("demo")
@click.option(
    "--db",
    "db",
    metavar="URL",
    default=None,
    help="Database for the demo (default: sqlite:///klmon-demo.db in this directory). Only "
    "the klmon-demo project is replaced; other runs there are left alone.",
)
@click.option("--no-serve", is_flag=True, help="Build and check alerts, then exit (for scripts).")
@click.option(
    "--port",
    default=8050,
    show_default=True,
    help="Dashboard port on 127.0.0.1 (the next free one if it is busy).",
)
@click.option(
    "--steps",
    default=400,
    show_default=True,
    type=click.IntRange(60, 20_000),
    help="Steps of history per simulated run.",
)
def demo_cmd(db: str | None, no_serve: bool, port: int, steps: int) -> None:
    """Build a demo database of simulated RLHF runs (healthy, reward hacking, reference
    mismatch with negative KL, a KL spike, and one still training), run the alert engine
    over it, and serve the dashboard on 127.0.0.1 while the live run keeps logging.

    Running it again replaces the demo runs (nothing is duplicated).

    \b
    Example:
      klmon demo                 # then open the printed URL; Ctrl-C stops
      klmon demo --no-serve && klmon runs --db sqlite:///klmon-demo.db
    """
    started = time.perf_counter()
    from monitor.demo import DEMO_PROJECT, DashboardServer, LiveRun, build_demo, default_db_url

    url = db or default_db_url()
    shown_url = redact_url(url)
    click.echo(f"klmon demo: building 5 simulated runs in {shown_url}")
    total = 4 * steps + max(steps // 2, 30)
    with click.progressbar(length=total, label="simulating and storing", width=30) as bar:
        summary = build_demo(url, steps=steps, progress=bar.update)
    click.echo(
        f"{summary.steps:,} steps, {summary.samples:,} samples with per-token log-probs, "
        f"in {summary.seconds:.1f} s:"
    )
    from monitor.demo import demo_runs

    for spec in demo_runs(steps):
        click.echo(f"  {summary.run_ids[spec.name]:>3}  {spec.name:<20} {spec.story}")

    server = None
    if not no_serve:
        server = DashboardServer(url, "127.0.0.1", port)

    from monitor.alerts import AlertEngine, load_rules
    from monitor.alerts.notify import senders_for
    from monitor.store import Database, list_events

    logging.getLogger("monitor.alerts").setLevel(logging.ERROR)  # printed below instead
    settings, mail_where = _alert_settings(url, server.url if server else None)
    database = Database.open(url)
    engine = AlertEngine(
        database, load_rules(settings.rules_path), settings=settings, senders=senders_for(settings)
    )
    with click.progressbar(length=1, label="running the alert engine", width=30) as bar:
        report = engine.run_once()
        bar.update(1)
    events = list_events(database, state=["firing", "resolved"])
    events = events.sort_values(["run_id", "start_step"])
    click.echo(
        f"alert engine ({len(engine.rules)} rules) over {report.steps_evaluated:,} steps: "
        f"{len(events)} alerts fired ({int((events['state'] == 'firing').sum())} still firing)"
    )
    _echo_alerts(events)
    click.echo(f"alert emails: {report.sent} {mail_where}")
    for err in report.errors:
        click.echo(f"error: {err}", err=True)
    if server is None:
        elapsed = time.perf_counter() - started
        click.echo(f"done in {elapsed:.1f} s. Try: klmon runs --db {shown_url}")
        database.dispose()
        return

    live_name = next(s.name for s in demo_runs(steps) if s.status == "running")

    def on_alert(rep: Any) -> None:
        for t in rep.transitions:
            if t.to_state in ("firing", "resolved"):
                click.echo(
                    f"  live: {t.to_state.upper()} {t.severity} "
                    f"{rep.run_labels.get(t.run_id, t.run_id)} {t.rule} at step {t.step}"
                )

    live = LiveRun(url, steps=steps, engine=engine, on_alert=on_alert).start()
    server.start()
    ids = ",".join(str(summary.run_ids[s.name]) for s in demo_runs(steps)[:4])
    click.echo("")
    click.echo(f"dashboard: {server.url}/   (served in {time.perf_counter() - started:.1f} s)")
    click.echo(f"  compare: {server.url}/compare?runs={ids}")
    click.echo(f"  alerts:  {server.url}/alerts")
    click.echo(
        f"{DEMO_PROJECT}/{live_name} logs a step every second; about a minute from now its "
        "KL shifts up past its budget and the alert fires here and in the dashboard."
    )
    click.echo("Ctrl-C stops the demo.")

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("\nstopping: finishing the live run")
    finally:
        live.stop()
        server.stop()
        database.dispose()
